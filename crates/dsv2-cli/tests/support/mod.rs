//! Helpers shared by the CLI's test files.

/// Whether this CPU computes q8 prompt rows in bf16 (AVX-512 F, BW and BF16, not turned
/// off by `DSV2_BF16_ATTENTION=0`), as `dsv2_cpu`'s `q8_bf16::available` decides.
pub fn bf16_prompt_rows() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512bf16")
            && std::env::var("DSV2_BF16_ATTENTION").map_or(true, |v| v != "0")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}
