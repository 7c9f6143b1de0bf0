//! Errors of the CUDA backend: each names the operation, kernel or library call and, where
//! it helps, the shapes involved.

use dsv2_backend::BackendError;

/// What went wrong on the CUDA side.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// No usable driver or library: the binary runs, but there is no GPU to run on.
    #[error("CUDA is not available: {0}")]
    Unavailable(String),
    /// A driver call failed.
    #[error("{op}: CUDA driver error {code}")]
    Driver { op: String, code: String },
    /// A cuBLAS call failed.
    #[error("{op}: cuBLAS error {code}")]
    Blas { op: String, code: String },
    /// NVRTC could not compile a kernel module.
    #[error("compiling kernel module `{module}` for {arch} with NVRTC: {log}")]
    Compile {
        module: String,
        arch: String,
        log: String,
    },
    /// Shapes or settings the kernels do not support.
    #[error("{op}: {problem}")]
    Unsupported { op: String, problem: String },
}

/// Result alias of the crate.
pub type Result<T, E = CudaError> = std::result::Result<T, E>;

impl From<CudaError> for BackendError {
    fn from(e: CudaError) -> Self {
        BackendError::Device {
            op: "cuda",
            problem: e.to_string(),
        }
    }
}

/// Adds the operation's name to a driver error.
pub(crate) trait DriverContext<T> {
    fn ctx(self, op: impl Into<String>) -> Result<T>;
}

impl<T> DriverContext<T> for std::result::Result<T, cudarc::driver::DriverError> {
    fn ctx(self, op: impl Into<String>) -> Result<T> {
        self.map_err(|e| CudaError::Driver {
            op: op.into(),
            code: format!("{:?}", e.0),
        })
    }
}

impl<T> DriverContext<T> for std::result::Result<T, cudarc::cublas::result::CublasError> {
    fn ctx(self, op: impl Into<String>) -> Result<T> {
        self.map_err(|e| CudaError::Blas {
            op: op.into(),
            code: format!("{:?}", e.0),
        })
    }
}

pub(crate) fn unsupported(op: &str, problem: impl Into<String>) -> CudaError {
    CudaError::Unsupported {
        op: op.to_string(),
        problem: problem.into(),
    }
}
