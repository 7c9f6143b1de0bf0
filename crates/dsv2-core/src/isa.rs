//! Which x86-64 instruction sets the CPU kernels may use.
//!
//! Every kernel picks its path at run time from what the CPU has (AVX-512 with VNNI and
//! BF16, AVX2+FMA, or plain Rust). `DSV2_CPU_ISA` lowers that ceiling, so that one machine
//! runs, tests and measures the paths other CPUs take:
//!
//! | value | kernels allowed | CPUs that run this way |
//! |---|---|---|
//! | `native` (default) | everything the CPU has | |
//! | `avx512` | AVX-512 F/BW/VL/DQ and VNNI, no AVX-512 BF16 | Intel Cascade Lake, Ice Lake |
//! | `avx2` | AVX2, FMA and F16C (no AVX-512, no AVX-VNNI) | AMD Zen 2/3, Intel Haswell-Skylake |
//! | `portable` | no SIMD intrinsics | any CPU |
//!
//! The value is a ceiling: a CPU without AVX-512 runs its AVX2 paths under `avx512` too.
//! The `gemm` crate, which computes f32 prefill attention, dispatches on its own and is not
//! limited.

use std::sync::OnceLock;

/// The environment variable that limits the CPU kernels' instruction sets.
pub const ISA_LIMIT_ENV: &str = "DSV2_CPU_ISA";

/// The most a kernel may use, in increasing order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum IsaLimit {
    /// Plain Rust.
    Portable,
    /// AVX2, FMA and F16C.
    Avx2,
    /// AVX-512 F/BW/VL/DQ and VNNI, without BF16.
    Avx512,
    /// Everything the CPU has.
    Native,
}

impl IsaLimit {
    /// Every limit, from the least to the most.
    pub const ALL: [IsaLimit; 4] = [
        IsaLimit::Portable,
        IsaLimit::Avx2,
        IsaLimit::Avx512,
        IsaLimit::Native,
    ];

    /// The value of [`ISA_LIMIT_ENV`] that selects this limit.
    pub fn name(self) -> &'static str {
        match self {
            IsaLimit::Portable => "portable",
            IsaLimit::Avx2 => "avx2",
            IsaLimit::Avx512 => "avx512",
            IsaLimit::Native => "native",
        }
    }

    /// Parses a value of [`ISA_LIMIT_ENV`] (case-insensitive, surrounding blanks ignored).
    pub fn parse(value: &str) -> Result<IsaLimit, String> {
        let value = value.trim();
        IsaLimit::ALL
            .into_iter()
            .find(|l| l.name().eq_ignore_ascii_case(value))
            .ok_or_else(|| {
                let names: Vec<&str> = IsaLimit::ALL.iter().map(|l| l.name()).collect();
                format!(
                    "{ISA_LIMIT_ENV}={value:?} is not one of {}",
                    names.join(", ")
                )
            })
    }

    /// The limit [`ISA_LIMIT_ENV`] sets ([`IsaLimit::Native`] when unset or empty).
    pub fn from_env() -> Result<IsaLimit, String> {
        match std::env::var(ISA_LIMIT_ENV) {
            Ok(v) if !v.trim().is_empty() => IsaLimit::parse(&v),
            Ok(_) | Err(std::env::VarError::NotPresent) => Ok(IsaLimit::Native),
            Err(std::env::VarError::NotUnicode(v)) => {
                Err(format!("{ISA_LIMIT_ENV}={v:?} is not valid UTF-8"))
            }
        }
    }
}

/// The limit of this process, read from [`ISA_LIMIT_ENV`] once.
///
/// # Panics
/// If the variable holds an unknown value; programs call [`IsaLimit::from_env`] first to
/// report it as an error (the `dsv2` binary does, before any work).
pub fn limit() -> IsaLimit {
    static LIMIT: OnceLock<IsaLimit> = OnceLock::new();
    *LIMIT.get_or_init(|| IsaLimit::from_env().unwrap_or_else(|e| panic!("{e}")))
}

/// AVX2, FMA and F16C: present and allowed.
pub fn avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        limit() >= IsaLimit::Avx2
            && std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// AVX-512 F, BW, VL and DQ (and [`avx2`]): present and allowed.
pub fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        limit() >= IsaLimit::Avx512
            && avx2()
            && std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vl")
            && std::is_x86_feature_detected!("avx512dq")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// [`avx512`] with VNNI (int8 dot products): present and allowed.
pub fn avx512_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        avx512() && std::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// [`avx512`] with BF16 dot products (`vdpbf16ps`): present and allowed.
pub fn avx512_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        limit() >= IsaLimit::Native && avx512() && std::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether this CPU's `vdpbf16ps` keeps pace with its `vpdpbusd` and its FMAs: issued at
/// least as often, so that 32 bf16 multiply-adds cost no more than the two int8 terms of a
/// q8 product's 64 (`vpdpbusd` twice) or two f32 FMAs. The kernels that use bf16 for speed
/// alone (a q8 model's prompt rows, the decode attention over a bf16 cache) ask it. AMD's
/// Zen 4 and 5 run them on the same vector pipes (measured on a Zen 4 VM: 0.47 bf16 TFLOP/s
/// against 0.94 int8 TOP/s; the bf16 decode attention 1.65× the f32 one). Intel's cores
/// with AVX-512 BF16 (Cooper Lake, Sapphire, Emerald and Granite Rapids) issue `vdpbf16ps`
/// to one port, `vpdpbusd` and FMAs to two: on a 16-core Sapphire Rapids VM the peaks were
/// 0.97 TFLOP/s against 7.5 TOP/s, q8 prompt rows ran 1.5× faster as int8 terms and the
/// decode attention 12-26% faster in f32. Told by the CPU's vendor, never measured, so a
/// machine always takes the same arithmetic (and gives the same logits);
/// [`BF16_KEEPS_PACE_ENV`] overrides it.
pub fn bf16_dot_keeps_pace() -> bool {
    static KEEPS_PACE: OnceLock<bool> = OnceLock::new();
    *KEEPS_PACE.get_or_init(|| {
        avx512_bf16()
            && match std::env::var(BF16_KEEPS_PACE_ENV) {
                Ok(v) if !v.trim().is_empty() => v.trim() != "0",
                _ => bf16_dot_keeps_pace_on(&vendor()),
            }
    })
}

/// The environment variable that overrides [`bf16_dot_keeps_pace`] on a CPU with AVX-512
/// BF16: `0` says it does not, any other value that it does (unset or empty: the CPU's
/// vendor decides).
pub const BF16_KEEPS_PACE_ENV: &str = "DSV2_BF16_KEEPS_PACE";

/// [`bf16_dot_keeps_pace`] for the CPUID vendor string `vendor`, given AVX-512 BF16.
fn bf16_dot_keeps_pace_on(vendor: &str) -> bool {
    vendor == "AuthenticAMD"
}

/// The CPUID vendor string ("AuthenticAMD", "GenuineIntel", …; empty off x86-64).
fn vendor() -> String {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: CPUID leaf 0 exists on every x86-64 CPU.
        #[allow(unused_unsafe)]
        let r = unsafe { std::arch::x86_64::__cpuid(0) };
        [r.ebx, r.edx, r.ecx]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .map(char::from)
            .collect()
    }
    #[cfg(not(target_arch = "x86_64"))]
    String::new()
}

/// AVX-VNNI (the VEX-encoded int8 dot products of CPUs without AVX-512) with [`avx2`]:
/// present and allowed.
pub fn avx_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        limit() >= IsaLimit::Native && avx2() && std::is_x86_feature_detected!("avxvnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_limit_parses_from_its_name_and_nothing_else_does() {
        for l in IsaLimit::ALL {
            assert_eq!(IsaLimit::parse(l.name()), Ok(l));
            assert_eq!(
                IsaLimit::parse(&format!(" {} ", l.name().to_uppercase())),
                Ok(l)
            );
        }
        let err = IsaLimit::parse("sse4").unwrap_err();
        assert!(
            err.contains("DSV2_CPU_ISA") && err.contains("sse4") && err.contains("avx2"),
            "{err}"
        );
        assert!(IsaLimit::Portable < IsaLimit::Avx2 && IsaLimit::Avx512 < IsaLimit::Native);
    }

    #[test]
    fn each_level_implies_the_ones_below() {
        assert!(!avx512() || avx2());
        assert!(!avx512_vnni() || avx512());
        assert!(!avx512_bf16() || avx512());
        assert!(!avx_vnni() || avx2());
        assert!(!bf16_dot_keeps_pace() || avx512_bf16());
    }

    #[test]
    fn bf16_keeps_pace_on_amd_only() {
        assert!(bf16_dot_keeps_pace_on("AuthenticAMD"));
        assert!(!bf16_dot_keeps_pace_on("GenuineIntel"));
        assert!(!bf16_dot_keeps_pace_on(""));
        #[cfg(target_arch = "x86_64")]
        assert_eq!(vendor().len(), 12, "{:?}", vendor());
    }
}
