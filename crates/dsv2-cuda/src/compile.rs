//! Kernel modules: `.cu` sources compiled by NVRTC for the device's architecture at first
//! use, and cached on disk as cubin, keyed by a hash of the source, the options and the
//! NVRTC version.
//!
//! The cache lives in `$DSV2_KERNEL_CACHE`, else `$XDG_CACHE_HOME/dsv2/kernels`, else
//! `~/.cache/dsv2/kernels`. A cached file that fails to load is compiled again.

use std::ffi::{c_char, c_int, CString};
use std::path::PathBuf;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaModule};
use cudarc::nvrtc::{result as nvrtc, sys as nvrtc_sys, Ptx};

use crate::error::{CudaError, Result};

/// The helpers every module starts with.
const COMMON: &str = include_str!("../kernels/common.cuh");

/// A kernel module's name and source.
pub(crate) struct Source {
    pub name: &'static str,
    pub code: &'static str,
}

pub(crate) const ELEMENTWISE: Source = Source {
    name: "elementwise",
    code: include_str!("../kernels/elementwise.cu"),
};
pub(crate) const ATTENTION: Source = Source {
    name: "attention",
    code: include_str!("../kernels/attention.cu"),
};
pub(crate) const MOE: Source = Source {
    name: "moe",
    code: include_str!("../kernels/moe.cu"),
};

/// Every kernel module.
const MODULES: [Source; 3] = [ELEMENTWISE, ATTENTION, MOE];

/// True when the NVRTC library can be loaded (no GPU or driver is needed to compile).
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to load the library.
    unsafe { nvrtc_sys::is_culib_present() }
}

/// Compiles every kernel module for `arch` in both element types, without a GPU (for
/// tests and checks); returns the cubin size of each module and element type.
///
/// # Errors
/// The first module that fails to compile, with NVRTC's log.
pub fn compile_all(arch: (i32, i32)) -> Result<Vec<(String, usize)>> {
    let mut sizes = Vec::new();
    for source in &MODULES {
        for bf16 in [false, true] {
            let (full, options) = prepare(source, arch, bf16);
            let cubin = compile(source.name, &full, &options, &arch_name(arch))?;
            let dtype = if bf16 { "bf16" } else { "f32" };
            sizes.push((format!("{}.{dtype}", source.name), cubin.len()));
        }
    }
    Ok(sizes)
}

fn arch_name(arch: (i32, i32)) -> String {
    format!("sm_{}{}", arch.0, arch.1)
}

/// The source of `file` (`common.cuh` or a module's `.cu`) from `$DSV2_CUDA_KERNEL_DIR`
/// when set and present there (kernel variants for comparisons, without a rebuild), else
/// `embedded`.
fn kernel_text(file: &str, embedded: &'static str) -> std::borrow::Cow<'static, str> {
    std::env::var_os("DSV2_CUDA_KERNEL_DIR")
        .and_then(|dir| std::fs::read_to_string(PathBuf::from(dir).join(file)).ok())
        .map_or(
            std::borrow::Cow::Borrowed(embedded),
            std::borrow::Cow::Owned,
        )
}

/// The full source and NVRTC options of a module.
fn prepare(source: &Source, arch: (i32, i32), bf16: bool) -> (String, Vec<String>) {
    let mut options = vec![
        format!("--gpu-architecture={}", arch_name(arch)),
        "--std=c++17".to_string(),
    ];
    if bf16 {
        options.push("-DDSV2_BF16=1".to_string());
    }
    // Kernel variants for comparisons (e.g. `-DDSV2_NO_PREFETCH -DGEMV_UNROLL=4`); part of
    // the cache key like every option.
    if let Ok(extra) = std::env::var("DSV2_CUDA_KERNEL_OPTIONS") {
        options.extend(extra.split_whitespace().map(str::to_string));
    }
    // Our kernels need no CUDA header; the toolkit's folder is named for kernels that
    // will (cuda_bf16.h, mma.h), where it exists.
    if let Some(dir) = cuda_include_dir() {
        options.push(format!("--include-path={}", dir.display()));
    }
    let full = format!(
        "{}\n#line 1 \"{}.cu\"\n{}",
        kernel_text("common.cuh", COMMON),
        source.name,
        kernel_text(&format!("{}.cu", source.name), source.code)
    );
    (full, options)
}

/// `$CUDA_HOME/include`, `$CUDA_PATH/include` or `/usr/local/cuda/include`, if present.
fn cuda_include_dir() -> Option<PathBuf> {
    ["CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(|v| std::env::var_os(v).map(|d| PathBuf::from(d).join("include")))
        .chain(std::iter::once(PathBuf::from("/usr/local/cuda/include")))
        .find(|d| d.join("cuda_bf16.h").is_file())
}

/// FNV-1a, 64 bits: a stable key for the cache (not a security boundary).
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for part in parts {
        for &b in *part {
            h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
        h = (h ^ 0xff).wrapping_mul(0x100_0000_01b3);
    }
    h
}

fn cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DSV2_KERNEL_CACHE") {
        return Some(PathBuf::from(dir));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("dsv2").join("kernels"))
}

/// The NVRTC version, `(major, minor)`.
pub(crate) fn nvrtc_version() -> Result<(i32, i32)> {
    let (mut major, mut minor): (c_int, c_int) = (0, 0);
    // SAFETY: both pointers are valid for one c_int each.
    unsafe { nvrtc_sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| CudaError::Unavailable(format!("nvrtcVersion failed: {e}")))?;
    Ok((major, minor))
}

/// Loads `source` compiled for `arch` (`(major, minor)` compute capability), with bf16 or
/// f32 elements, from the disk cache or NVRTC.
pub(crate) fn load_module(
    ctx: &Arc<CudaContext>,
    source: &Source,
    arch: (i32, i32),
    bf16: bool,
) -> Result<Arc<CudaModule>> {
    let arch_name = arch_name(arch);
    let (full, options) = prepare(source, arch, bf16);
    let (major, minor) = nvrtc_version()?;
    let key = fnv1a(&[
        full.as_bytes(),
        options.join(" ").as_bytes(),
        format!("nvrtc {major}.{minor}").as_bytes(),
    ]);
    let dtype = if bf16 { "bf16" } else { "f32" };
    let file = cache_dir().map(|d| {
        d.join(format!(
            "{}-{dtype}-{arch_name}-{key:016x}.cubin",
            source.name
        ))
    });
    if let Some(cubin) = file.as_ref().and_then(|f| std::fs::read(f).ok()) {
        if let Ok(module) = ctx.load_module(Ptx::from_binary(cubin)) {
            return Ok(module);
        }
    }
    let cubin = compile(source.name, &full, &options, &arch_name)?;
    if let Some(file) = &file {
        store(file, &cubin);
    }
    ctx.load_module(Ptx::from_binary(cubin))
        .map_err(|e| CudaError::Driver {
            op: format!("loading kernel module `{}` ({arch_name})", source.name),
            code: format!("{:?}", e.0),
        })
}

/// Writes the cache file atomically; a failure only costs a compilation next time.
fn store(file: &std::path::Path, cubin: &[u8]) {
    let Some(dir) = file.parent() else { return };
    if std::fs::create_dir_all(dir).is_err() {
        return;
    }
    let tmp = file.with_extension(format!("tmp{}", std::process::id()));
    if std::fs::write(&tmp, cubin).is_ok() && std::fs::rename(&tmp, file).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

fn compile(name: &str, code: &str, options: &[String], arch: &str) -> Result<Vec<u8>> {
    let fail = |log: String| CudaError::Compile {
        module: name.to_string(),
        arch: arch.to_string(),
        log,
    };
    let src = CString::new(code).map_err(|_| fail("source contains a NUL byte".into()))?;
    let file_name = CString::new(format!("{name}.cu")).expect("no NUL in module names");
    let prog = nvrtc::create_program(&src, Some(&file_name))
        .map_err(|e| fail(format!("nvrtcCreateProgram: {e}")))?;
    // SAFETY: `prog` was created above and is destroyed once, below.
    let compiled = unsafe { nvrtc::compile_program(prog, options) };
    let result = match compiled {
        Ok(()) => cubin(prog).map_err(|e| fail(format!("nvrtcGetCUBIN: {e}"))),
        Err(e) => {
            // SAFETY: as above.
            let log = unsafe { nvrtc::get_program_log(prog) }
                .map(|l| {
                    let bytes: Vec<u8> =
                        l.iter().map(|&c| c as u8).take_while(|&b| b != 0).collect();
                    String::from_utf8_lossy(&bytes).into_owned()
                })
                .unwrap_or_default();
            Err(fail(format!("{e}\n{log}")))
        }
    };
    // SAFETY: as above; `prog` is not used afterwards.
    let _ = unsafe { nvrtc::destroy_program(prog) };
    result
}

/// The cubin of a compiled program (`--gpu-architecture=sm_XX` produces machine code).
fn cubin(prog: nvrtc_sys::nvrtcProgram) -> Result<Vec<u8>, nvrtc::NvrtcError> {
    let mut size = 0usize;
    // SAFETY: `prog` is a compiled program; `size` is a valid out pointer.
    unsafe { nvrtc_sys::nvrtcGetCUBINSize(prog, &mut size) }.result()?;
    let mut buf = vec![0u8; size];
    // SAFETY: `buf` holds `size` bytes, as NVRTC asked for.
    unsafe { nvrtc_sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr() as *mut c_char) }.result()?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_key_depends_on_every_part() {
        let a = fnv1a(&[b"src", b"opts"]);
        assert_eq!(a, fnv1a(&[b"src", b"opts"]));
        assert_ne!(a, fnv1a(&[b"src", b"opts2"]));
        assert_ne!(a, fnv1a(&[b"sr", b"copts"]));
    }
}
