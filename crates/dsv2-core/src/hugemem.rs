//! Weight memory in transparent huge pages.
//!
//! Decode streams every weight matrix from DRAM once per step. On 4 KiB pages each page
//! costs a TLB walk and the hardware stream prefetchers stop at every page boundary; on
//! 2 MiB pages neither happens. Measured on the 2-core development VM (8 expert matrices
//! of 1408 × 2048 in a row, `qmatmul` at m = 1, interleaved A/B runs): q8 38 → 45 GB/s
//! best-of, 23 → 32 GB/s mean on a loaded machine; q4 42 → 48 GB/s best-of.
//!
//! Weights made in memory (quantized at load, or random bench weights) are carved out
//! of large anonymous mappings advised `MADV_HUGEPAGE` (Linux; elsewhere they are plain
//! anonymous mappings). Only touched pages become resident, so the unused tail of a
//! chunk costs at most one partly filled huge page. Small tensors stay in ordinary heap
//! vectors. `DSV2_HUGE_PAGES=0` keeps every buffer on the heap (A/B on 8 V2-Lite layers at
//! q4: decode 70-77% of the floor instead of 79-81%, load ~10% shorter).

use std::sync::{Arc, Mutex};

use crate::checkpoint::Bytes;

/// Huge-page size the mappings are aligned to.
const HUGE: usize = 2 << 20;
/// Size of a shared chunk.
const CHUNK: usize = 256 << 20;
/// Tensors at least this large get a mapping of their own.
const OWN_MAPPING: usize = 64 << 20;
/// Below this a buffer stays on the heap (a huge page would be mostly empty).
const MIN_HUGE: usize = 256 << 10;
/// Alignment of every buffer carved from a chunk (a cache line).
const ALIGN: usize = 64;

/// One anonymous mapping, shared by the buffers carved from it.
struct Mapping {
    /// Keeps the memory mapped; accessed only through `base`.
    _map: memmap2::MmapMut,
    /// The first huge-page-aligned byte of the mapping.
    base: *mut u8,
}

// SAFETY: the mapping is never accessed as a whole: each buffer carved from it reads and
// writes only its own disjoint range through raw pointers.
unsafe impl Sync for Mapping {}
unsafe impl Send for Mapping {}

impl Mapping {
    /// A zeroed mapping with at least `len` bytes from a huge-page boundary.
    fn new(len: usize) -> std::io::Result<Arc<Mapping>> {
        let mut map = memmap2::MmapMut::map_anon(len + HUGE)?;
        #[cfg(target_os = "linux")]
        {
            // Best effort: without THP the memory works the same, only slower.
            let _ = map.advise(memmap2::Advice::HugePage);
        }
        let skip = (map.as_ptr() as usize).next_multiple_of(HUGE) - map.as_ptr() as usize;
        // SAFETY: skip < HUGE, inside the mapping.
        let base = unsafe { map.as_mut_ptr().add(skip) };
        Ok(Arc::new(Mapping { _map: map, base }))
    }
}

/// The read-only window of one frozen buffer.
struct Window {
    mapping: Arc<Mapping>,
    offset: usize,
    len: usize,
}

impl AsRef<[u8]> for Window {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: offset..offset + len lies in the mapping and belongs to this window;
        // it was written before the window existed and is never written again.
        unsafe { std::slice::from_raw_parts(self.mapping.base.add(self.offset), self.len) }
    }
}

/// A zeroed, writable buffer for one tensor plane; [`HugeBuf::freeze`] makes it
/// immutable [`Bytes`].
pub struct HugeBuf {
    storage: Storage,
    len: usize,
}

enum Storage {
    Heap(Vec<u8>),
    Mapped {
        mapping: Arc<Mapping>,
        offset: usize,
    },
}

impl HugeBuf {
    /// The bytes, for filling.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        match &mut self.storage {
            Storage::Heap(v) => v,
            // SAFETY: offset..offset + len lies in the mapping and belongs to this buffer
            // only (the arena hands out disjoint ranges); no `Window` of it exists yet.
            Storage::Mapped { mapping, offset } => unsafe {
                std::slice::from_raw_parts_mut(mapping.base.add(*offset), self.len)
            },
        }
    }

    /// Immutable bytes sharing this buffer's memory.
    pub fn freeze(self) -> Bytes {
        match self.storage {
            Storage::Heap(v) => Bytes::from_vec(v),
            Storage::Mapped { mapping, offset } => Bytes::from_owner(
                Arc::new(Window {
                    mapping,
                    offset,
                    len: self.len,
                }),
                self.len,
            ),
        }
    }
}

/// The chunk buffers are carved from (the rest of it after `used`).
struct Current {
    mapping: Arc<Mapping>,
    used: usize,
}

static CURRENT: Mutex<Option<Current>> = Mutex::new(None);

/// Whether weight memory is advised into huge pages: yes unless `DSV2_HUGE_PAGES=0`
/// (read once).
fn enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var("DSV2_HUGE_PAGES").map_or(true, |v| v != "0"))
}

/// A zeroed buffer of `len` bytes, in huge pages when it is large enough (and
/// `DSV2_HUGE_PAGES` is not `0`; then an ordinary heap buffer).
///
/// # Panics
/// If the system refuses the mapping (out of address space or memory).
pub fn alloc(len: usize) -> HugeBuf {
    if len < MIN_HUGE || !enabled() {
        return HugeBuf {
            storage: Storage::Heap(vec![0; len]),
            len,
        };
    }
    let map_failed = |e: std::io::Error| -> ! { panic!("cannot map {len} bytes of memory: {e}") };
    if len >= OWN_MAPPING {
        let mapping = Mapping::new(len).unwrap_or_else(|e| map_failed(e));
        return HugeBuf {
            storage: Storage::Mapped { mapping, offset: 0 },
            len,
        };
    }
    let mut current = CURRENT.lock().unwrap_or_else(|e| e.into_inner());
    let fits = |c: &Current| c.used + len <= CHUNK;
    if !current.as_ref().is_some_and(fits) {
        *current = Some(Current {
            mapping: Mapping::new(CHUNK).unwrap_or_else(|e| map_failed(e)),
            used: 0,
        });
    }
    let chunk = current.as_mut().expect("a chunk");
    let offset = chunk.used;
    chunk.used = (chunk.used + len).next_multiple_of(ALIGN);
    HugeBuf {
        storage: Storage::Mapped {
            mapping: chunk.mapping.clone(),
            offset,
        },
        len,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_zeroed_disjoint_and_aligned() {
        let sizes = [10, 300 << 10, 5 << 20, 70 << 20, 1 << 20, 300 << 10];
        let mut bufs: Vec<HugeBuf> = sizes.iter().map(|&n| alloc(n)).collect();
        for (i, b) in bufs.iter_mut().enumerate() {
            let s = b.as_mut_slice();
            assert_eq!(s.len(), sizes[i]);
            assert!(s.iter().all(|&v| v == 0));
            s.fill(i as u8 + 1);
        }
        let frozen: Vec<Bytes> = bufs.into_iter().map(HugeBuf::freeze).collect();
        for (i, b) in frozen.iter().enumerate() {
            let s = b.as_slice();
            assert_eq!(s.len(), sizes[i]);
            assert!(
                s.iter().all(|&v| v == i as u8 + 1),
                "buffer {i} overwritten"
            );
            if sizes[i] >= MIN_HUGE {
                assert!((s.as_ptr() as usize).is_multiple_of(ALIGN));
            }
        }
    }
}
