//! The backend's errors, by where they come from: a missing library or device, the driver,
//! cuBLAS or cuBLASLt, NVRTC, a kernel that is not in a module, or a step or model the kernels
//! do not take. The engine sees them as `EngineError::Cuda`.

use cudarc::driver::DriverError;

/// What can go wrong on the GPU.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// No usable device: a missing driver, NVRTC or cuBLAS library, or no GPU (what
    /// [`super::probe`] found).
    #[error("{0}")]
    Unavailable(String),
    /// A driver call failed (out of memory, a launch or copy failure, a failed capture).
    #[error("driver: {0}")]
    Driver(#[from] DriverError),
    /// A cuBLAS call failed.
    #[error("cuBLAS: {0:?}")]
    Blas(#[from] cudarc::cublas::result::CublasError),
    /// A cuBLASLt call failed, or it has no algorithm for a product.
    #[error("cuBLASLt: {0}")]
    BlasLt(String),
    /// NVRTC rejected a kernel source (the log names the line).
    #[error("NVRTC compiling kernels/{file} for {arch}: {message}")]
    Compile {
        /// The source file under `kernels/`.
        file: &'static str,
        /// The target architecture (`sm_90`).
        arch: &'static str,
        /// NVRTC's log.
        message: String,
    },
    /// A compiled module could not be loaded, or lacks a kernel.
    #[error("loading {what}: {source}")]
    Load {
        /// The module or kernel.
        what: String,
        /// The driver's error.
        source: DriverError,
    },
    /// A model or step the kernels cannot run (too many heads per KV head, a step past a grid
    /// dimension, a block table outside the pool, logits of another vocabulary).
    #[error("{0}")]
    Unsupported(String),
    /// A CUDA graph capture ended without a graph.
    #[error("the capture recorded no graph")]
    EmptyCapture,
}

impl From<cudarc::cublaslt::result::CublasError> for CudaError {
    fn from(e: cudarc::cublaslt::result::CublasError) -> Self {
        CudaError::BlasLt(format!("{e:?}"))
    }
}

/// The engine's error for any of the backend's: `.map_err(err)` at each call.
pub(super) fn err(e: impl Into<CudaError>) -> crate::EngineError {
    crate::EngineError::Cuda(e.into())
}
