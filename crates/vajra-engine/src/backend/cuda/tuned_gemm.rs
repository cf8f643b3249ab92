//! The projections of small steps through cuBLASLt with the algorithm chosen by timing
//! (`VAJRA_CUDA_GEMM=tuned`; the default, `cublas`, is `cublasGemmEx` and its own heuristic).
//!
//! At 1–128 tokens a projection reads its whole weight matrix for a few rows of output, so its
//! time is memory time, and how many thread blocks the kernel spreads over the GPU decides it:
//! ncu on an H100 (Llama-3-8B shape, batch 32) had cuBLAS's choice for QKV at 68 % and for O at
//! 63 % of DRAM peak, against 80 % for gate-up and down. So for each (tokens, k, n) seen with at
//! most [`MAX_TUNED_TOKENS`] tokens, cuBLASLt's heuristic proposes up to [`CANDIDATES`]
//! algorithms, each is timed on the step's own buffers, and the fastest is kept for the
//! backend's life (ties to the heuristic's order). Tuning needs a synchronisation, so it never
//! runs inside a CUDA-graph capture (a shape without a plan there goes to cuBLAS); in
//! `vajra-engine profile` it runs in the warm-up round, whose times are dropped. The algorithm a shape gets depends on timings, so two backends may round a product
//! differently; each keeps its choice, so one backend repeats itself exactly.

use super::err;
use crate::error::Result;
use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;
use cudarc::driver::CudaStream;
use std::collections::HashMap;
use std::ffi::c_void;

/// Steps of at most this many tokens have their projections tuned.
pub(super) const MAX_TUNED_TOKENS: usize = 128;
/// Algorithms asked of cuBLASLt's heuristic per shape.
const CANDIDATES: usize = 16;
/// Timed runs of each candidate (after one untimed run).
const REPS: usize = 5;

/// One shape's descriptors and chosen algorithm. Descriptors are destroyed on drop.
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    c: sys::cublasLtMatrixLayout_t,
    algo: sys::cublasLtMatmulAlgo_t,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: each descriptor was created for this plan and is destroyed once, here.
        unsafe {
            let _ = lt::destroy_matrix_layout(self.c);
            let _ = lt::destroy_matrix_layout(self.b);
            let _ = lt::destroy_matrix_layout(self.a);
            let _ = lt::destroy_matmul_desc(self.desc);
        }
    }
}

/// What tuning found for one shape (logged, and kept for `gpu-bench`).
#[derive(Clone, Debug, PartialEq)]
pub struct TunedShape {
    /// Tokens, input width, output width.
    pub shape: (usize, usize, usize),
    /// Candidates the heuristic proposed (and that ran).
    pub candidates: usize,
    /// The heuristic's first choice, µs.
    pub first_us: f64,
    /// The chosen one's index in the heuristic's list.
    pub chosen: usize,
    /// The chosen one's time, µs.
    pub chosen_us: f64,
}

/// The cuBLASLt handle and the plans of the shapes seen so far.
pub(super) struct TunedGemm {
    handle: sys::cublasLtHandle_t,
    plans: HashMap<(usize, usize, usize), Plan>,
    tuned: Vec<TunedShape>,
}

impl Drop for TunedGemm {
    fn drop(&mut self) {
        self.plans.clear();
        // SAFETY: the handle was created in `new` and every plan using it is gone.
        let _ = unsafe { lt::destroy_handle(self.handle) };
    }
}

/// `y[t × n] = x[t × k] · w[n × k]ᵀ`'s device pointers.
pub(super) struct Operands {
    pub x: u64,
    pub w: u64,
    pub y: u64,
}

impl TunedGemm {
    pub(super) fn new() -> Result<Self> {
        Ok(TunedGemm {
            handle: lt::create_handle().map_err(err)?,
            plans: HashMap::new(),
            tuned: Vec::new(),
        })
    }

    /// The shapes tuned so far, in order.
    pub(super) fn tuned(&self) -> &[TunedShape] {
        &self.tuned
    }

    /// Runs the product with (t, k, n)'s plan; `false` when it has none.
    pub(super) fn run(
        &self,
        stream: &CudaStream,
        shape: (usize, usize, usize),
        ops: &Operands,
        workspace: (u64, usize),
    ) -> Result<bool> {
        let Some(plan) = self.plans.get(&shape) else {
            return Ok(false);
        };
        self.launch(stream, plan, &plan.algo, ops, workspace)?;
        Ok(true)
    }

    fn launch(
        &self,
        stream: &CudaStream,
        plan: &Plan,
        algo: &sys::cublasLtMatmulAlgo_t,
        ops: &Operands,
        (ws, ws_size): (u64, usize),
    ) -> Result<()> {
        let (alpha, beta) = (1.0f32, 0.0f32);
        // SAFETY: the plan's layouts describe x (k × t, ld k), w (k × n read transposed, ld k)
        // and y (n × t, ld n), the sizes the caller's buffers hold; the workspace holds
        // `ws_size` bytes and outlives the stream's use of it.
        unsafe {
            lt::matmul(
                self.handle,
                plan.desc,
                (&alpha as *const f32).cast(),
                (&beta as *const f32).cast(),
                ops.w as *const c_void,
                plan.a,
                ops.x as *const c_void,
                plan.b,
                ops.y as *const c_void,
                plan.c,
                ops.y as *mut c_void,
                plan.c,
                algo,
                ws as *mut c_void,
                ws_size,
                stream.cu_stream() as sys::cudaStream_t,
            )
        }
        .map_err(err)
    }

    /// Chooses (t, k, n)'s algorithm by timing each candidate of the heuristic on `ops` (which
    /// ends holding the chosen algorithm's product), and keeps the plan.
    pub(super) fn tune(
        &mut self,
        stream: &CudaStream,
        shape: (usize, usize, usize),
        ops: &Operands,
        workspace: (u64, usize),
    ) -> Result<()> {
        let (t, k, n) = shape;
        let bf = sys::cudaDataType::CUDA_R_16BF;
        let desc = lt::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType::CUDA_R_32F,
        )
        .map_err(err)?;
        let transpose = cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_T as i32;
        let mut plan = Plan {
            desc,
            a: std::ptr::null_mut(),
            b: std::ptr::null_mut(),
            c: std::ptr::null_mut(),
            // SAFETY: an all-zero algorithm is a valid value of this plain struct; it is
            // replaced by the heuristic's before any use.
            algo: unsafe { std::mem::zeroed() },
        };
        // SAFETY: the attribute is a 32-bit cublasOperation_t, as cuBLASLt documents.
        unsafe {
            lt::set_matmul_desc_attribute(
                plan.desc,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                (&transpose as *const i32).cast(),
                size_of::<i32>(),
            )
        }
        .map_err(err)?;
        // Column-major, as `CudaBackend::gemm` calls cuBLAS: C (n × t) = Wᵀ · X.
        plan.a = lt::create_matrix_layout(bf, k as u64, n as u64, k as i64).map_err(err)?;
        plan.b = lt::create_matrix_layout(bf, k as u64, t as u64, k as i64).map_err(err)?;
        plan.c = lt::create_matrix_layout(bf, n as u64, t as u64, n as i64).map_err(err)?;
        let pref = lt::create_matmul_pref().map_err(err)?;
        let max_ws = workspace.1 as u64;
        let mut found: Vec<sys::cublasLtMatmulHeuristicResult_t> = Vec::with_capacity(CANDIDATES);
        let mut count = 0i32;
        // SAFETY: `pref` is live; `found` has room for CANDIDATES results, of which the call
        // initialises `count`.
        let asked = unsafe {
            lt::set_matmul_pref_attribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                (&max_ws as *const u64).cast(),
                size_of::<u64>(),
            )
            .and_then(|()| {
                sys::cublasLtMatmulAlgoGetHeuristic(
                    self.handle,
                    plan.desc,
                    plan.a,
                    plan.b,
                    plan.c,
                    plan.c,
                    pref,
                    CANDIDATES as i32,
                    found.as_mut_ptr(),
                    &mut count,
                )
                .result()
            })
            .map(|()| found.set_len(count.clamp(0, CANDIDATES as i32) as usize))
        };
        // SAFETY: created above, destroyed once.
        let _ = unsafe { lt::destroy_matmul_pref(pref) };
        asked.map_err(err)?;
        let event = || {
            stream
                .record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(err)
        };
        // (index, µs) of every candidate that ran.
        let mut timed: Vec<(usize, f64)> = Vec::new();
        for (i, cand) in found.iter().enumerate() {
            if cand.state != sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS
                || cand.workspaceSize > workspace.1
                || self
                    .launch(stream, &plan, &cand.algo, ops, workspace)
                    .is_err()
            {
                continue;
            }
            let start = event()?;
            let mut ok = true;
            for _ in 0..REPS {
                ok &= self
                    .launch(stream, &plan, &cand.algo, ops, workspace)
                    .is_ok();
            }
            let end = event()?;
            let ms = start.elapsed_ms(&end).map_err(err)?;
            if ok {
                timed.push((i, f64::from(ms) * 1e3 / REPS as f64));
            }
        }
        let Some(&(chosen, chosen_us)) = timed
            .iter()
            .min_by(|x, y| x.1.total_cmp(&y.1).then(x.0.cmp(&y.0)))
        else {
            return Err(err(super::CudaError::BlasLt(format!(
                "no algorithm for a {t}×{k} · ({n}×{k})ᵀ bf16 product (VAJRA_CUDA_GEMM=tuned)"
            ))));
        };
        plan.algo = found[chosen].algo;
        // The buffers end with the chosen algorithm's product, like every later step's.
        self.launch(stream, &plan, &plan.algo, ops, workspace)?;
        let first_us = timed.iter().find(|c| c.0 == 0).map_or(f64::NAN, |c| c.1);
        let record = TunedShape {
            shape,
            candidates: timed.len(),
            first_us,
            chosen,
            chosen_us,
        };
        tracing::info!(
            tokens = t,
            k,
            n,
            candidates = record.candidates,
            first_us = format!("{first_us:.1}"),
            chosen,
            chosen_us = format!("{chosen_us:.1}"),
            "cuBLASLt projection tuned"
        );
        self.tuned.push(record);
        self.plans.insert(shape, plan);
        Ok(())
    }
}
