//! The kernel sources compile with NVRTC for Hopper (sm_90) and Ampere (sm_80), in both
//! element types. Needs only the NVRTC library (no GPU); skipped when it is absent,
//! unless DSV2_REQUIRE_GPU is set.

#[test]
fn kernels_compile_for_sm90_and_sm80() {
    if !dsv2_cuda::compile::nvrtc_available() {
        assert!(
            std::env::var_os("DSV2_REQUIRE_GPU").is_none(),
            "DSV2_REQUIRE_GPU is set but libnvrtc could not be loaded"
        );
        eprintln!("skipped: libnvrtc not found (set LD_LIBRARY_PATH to a CUDA lib folder)");
        return;
    }
    for arch in [(9, 0), (8, 0)] {
        let sizes = dsv2_cuda::compile::compile_all(arch).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(sizes.len(), 6);
        for (name, bytes) in sizes {
            assert!(
                bytes > 1000,
                "sm_{}{} {name}: {bytes}-byte cubin",
                arch.0,
                arch.1
            );
        }
    }
}
