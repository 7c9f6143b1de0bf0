//! Per-thread scratch buffers for the per-token path.
//!
//! A buffer taken here comes from a per-thread pool and goes back to it when dropped, so
//! once a step of a given shape has run, the same step runs again without touching the
//! allocator (checked by `crates/dsv2-model/tests/no_alloc.rs`). Buffers are handed out
//! last-in first-out, so a fixed sequence of calls gets the same buffers every time.

use std::cell::RefCell;
use std::ops::{Deref, DerefMut};

/// Element types with a scratch pool.
pub(crate) trait Pooled: Copy + Default + 'static {
    /// Runs `f` on this thread's pool of `Self` buffers.
    fn with_pool<R>(f: impl FnOnce(&mut Vec<Vec<Self>>) -> R) -> Option<R>;
}

macro_rules! pooled {
    ($t:ty, $pool:ident) => {
        thread_local! {
            static $pool: RefCell<Vec<Vec<$t>>> = const { RefCell::new(Vec::new()) };
        }
        impl Pooled for $t {
            fn with_pool<R>(f: impl FnOnce(&mut Vec<Vec<Self>>) -> R) -> Option<R> {
                $pool.try_with(|p| f(&mut p.borrow_mut())).ok()
            }
        }
    };
}
pooled!(f32, F32_POOL);
pooled!(u32, U32_POOL);

/// A scratch buffer that returns to its thread's pool when dropped.
pub(crate) struct Scratch<T: Pooled> {
    /// Every value initialized: its length is the most this buffer was ever asked for,
    /// so a buffer handed back and forth between larger and smaller uses is never
    /// refilled for its larger ones.
    buf: Vec<T>,
    /// The length handed out; `None` for [`take_empty`]'s growable vector (all of `buf`).
    len: Option<usize>,
}

/// The pool's last buffer (or a new one), at least `len` values long.
fn pop<T: Pooled>(len: usize) -> Vec<T> {
    let mut buf = T::with_pool(|p| p.pop()).flatten().unwrap_or_default();
    if buf.len() < len {
        buf.resize(len, T::default());
    }
    buf
}

/// A scratch buffer of `len` default values (zeros).
pub(crate) fn take<T: Pooled>(len: usize) -> Scratch<T> {
    let mut buf = pop(len);
    buf[..len].fill(T::default());
    Scratch {
        buf,
        len: Some(len),
    }
}

/// A scratch buffer of `len` values left from its earlier uses (zeros where it never
/// was that long), for a caller that writes every value before reading it: no pass over
/// the buffer to zero it (a decode batch's expert rows and attention states are
/// megabytes, zeroed on one thread between parallel loops).
pub(crate) fn take_overwritten<T: Pooled>(len: usize) -> Scratch<T> {
    Scratch {
        buf: pop(len),
        len: Some(len),
    }
}

/// An empty scratch buffer (its capacity kept from earlier use), for `push`/`extend`.
pub(crate) fn take_empty<T: Pooled>() -> Scratch<T> {
    let mut buf = pop(0);
    buf.clear();
    Scratch { buf, len: None }
}

impl<T: Pooled> Scratch<T> {
    /// The underlying vector, to grow it in place (a [`take_empty`] buffer).
    pub(crate) fn vec(&mut self) -> &mut Vec<T> {
        if let Some(len) = self.len.take() {
            self.buf.truncate(len);
        }
        &mut self.buf
    }
}

impl<T: Pooled> Deref for Scratch<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match self.len {
            Some(len) => &self.buf[..len],
            None => &self.buf,
        }
    }
}

impl<T: Pooled> DerefMut for Scratch<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        match self.len {
            Some(len) => &mut self.buf[..len],
            None => &mut self.buf,
        }
    }
}

impl<'a, T: Pooled> IntoIterator for &'a Scratch<T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl<T: Pooled> Drop for Scratch<T> {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        // During thread teardown the pool may be gone: the buffer is then just freed.
        let _ = T::with_pool(|p| p.push(buf));
    }
}

/// Runs `f` on this thread's buffer `key`, or on a fresh one when that is borrowed
/// already (a product inside a task of an outer product's parallel loop).
pub(crate) fn with_local<T: Default + 'static, R>(
    key: &'static std::thread::LocalKey<RefCell<T>>,
    f: impl FnOnce(&mut T) -> R,
) -> R {
    key.with(|cell| match cell.try_borrow_mut() {
        Ok(mut local) => f(&mut local),
        Err(_) => f(&mut T::default()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_zeroed_and_reused() {
        let ptr = {
            let mut a = take::<f32>(100);
            a[3] = 7.0;
            a.as_ptr()
        };
        let b = take::<f32>(50);
        assert_eq!(b.as_ptr(), ptr, "the returned buffer is handed out again");
        assert!(b.iter().all(|&v| v == 0.0));
        let c = take::<f32>(10);
        assert_ne!(c.as_ptr(), ptr, "a buffer in use is not handed out twice");
    }

    #[test]
    fn overwritten_buffers_keep_their_values_and_grow_with_zeros() {
        let ptr = {
            let mut a = take::<u32>(100);
            a[3] = 7;
            a.as_ptr()
        };
        let mut b = take_overwritten::<u32>(50);
        assert_eq!(b.as_ptr(), ptr);
        assert_eq!((b.len(), b[3]), (50, 7), "left from the earlier use");
        b[49] = 5;
        drop(b);
        let c = take_overwritten::<u32>(80);
        assert_eq!(
            (c.len(), c[3], c[49]),
            (80, 7, 5),
            "a smaller use keeps the rest"
        );
        drop(c);
        let d = take_overwritten::<u32>(120);
        assert_eq!(d.len(), 120);
        assert!(d[100..].iter().all(|&v| v == 0), "grown with zeros");
        drop(d);
        let e = take::<u32>(110);
        assert!(e.iter().all(|&v| v == 0), "take zeroes what it hands out");
    }
}
