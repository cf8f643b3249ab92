//! Measurement: operator timing with events (profiles), copy bandwidth, GEMM rate, driver
//! version.

use super::*;

impl CudaBackend {
    /// The CUDA driver's version, e.g. `13.0`.
    pub fn driver_version() -> String {
        let mut v = 0i32;
        // SAFETY: writes one int; the driver library was found by `probe` before any backend exists.
        let ok = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) };
        if ok == cudarc::driver::sys::cudaError_enum::CUDA_SUCCESS {
            format!("{}.{}", v / 1000, (v % 1000) / 10)
        } else {
            "unknown".into()
        }
    }

    /// Device-to-device copy bandwidth, GB/s counting bytes read plus bytes written (as
    /// `profiles/measured/h100/device.json` does), over `mib` MiB buffers.
    ///
    /// # Errors
    /// A device failure (e.g. out of memory).
    pub fn copy_bandwidth(&self, mib: usize, reps: usize) -> Result<f64> {
        let n = mib << 19; // bf16 elements
        let src = self.stream.alloc_zeros::<bf16>(n).map_err(err)?;
        let mut dst = self.stream.alloc_zeros::<bf16>(n).map_err(err)?;
        let ev = || {
            self.stream
                .record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(err)
        };
        for _ in 0..2 {
            self.stream.memcpy_dtod(&src, &mut dst).map_err(err)?;
        }
        let a = ev()?;
        for _ in 0..reps {
            self.stream.memcpy_dtod(&src, &mut dst).map_err(err)?;
        }
        let b = ev()?;
        let ms = f64::from(a.elapsed_ms(&b).map_err(err)?) / reps as f64;
        Ok(2.0 * (n * 2) as f64 / (ms * 1e-3) / 1e9)
    }

    /// cuBLAS bf16 GEMM rate, TFLOP/s, for `y[t × n] = x[t × k] · w[n × k]ᵀ`.
    ///
    /// # Errors
    /// A device failure.
    pub fn gemm_tflops(&self, t: usize, k: usize, n: usize, reps: usize) -> Result<f64> {
        let x = self.stream.alloc_zeros::<bf16>(t * k).map_err(err)?;
        let w = self.stream.alloc_zeros::<bf16>(n * k).map_err(err)?;
        let mut y = self.stream.alloc_zeros::<bf16>(t * n).map_err(err)?;
        let ev = || {
            self.stream
                .record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(err)
        };
        for _ in 0..3 {
            self.gemm(&x, t, k, &w, n, &mut y)?;
        }
        let a = ev()?;
        for _ in 0..reps {
            self.gemm(&x, t, k, &w, n, &mut y)?;
        }
        let b = ev()?;
        let ms = f64::from(a.elapsed_ms(&b).map_err(err)?) / reps as f64;
        Ok(2.0 * (t * k * n) as f64 / (ms * 1e-3) / 1e12)
    }

    /// Records the end of operator `op` while profiling.
    pub(super) fn mark(&self, op: &'static str) -> Result<()> {
        if let Some(m) = self.marks.borrow_mut().as_mut() {
            let e = self
                .stream
                .record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(err)?;
            m.push((op, e));
        }
        Ok(())
    }

    /// Runs one step with an event after every operator and returns each operator's device
    /// time summed over the step, in ms (per-layer operators summed over all layers).
    ///
    /// # Errors
    /// As [`Backend::execute`].
    pub fn profile_step(&mut self, input: &StepInput<'_>) -> Result<BTreeMap<&'static str, f64>> {
        *self.marks.borrow_mut() = Some(Vec::new());
        self.mark("start")?;
        let run = self.forward(input, |_, _, _| Ok(()));
        let marks = self.marks.borrow_mut().take().unwrap_or_default();
        run?;
        self.stream.synchronize().map_err(err)?;
        let mut out = BTreeMap::new();
        for w in marks.windows(2) {
            let ms = w[0].1.elapsed_ms(&w[1].1).map_err(err)?;
            *out.entry(w[1].0).or_insert(0.0) += f64::from(ms);
        }
        Ok(out)
    }
}

impl Profiled for CudaBackend {
    fn profile_step(&mut self, input: &StepInput<'_>) -> Result<BTreeMap<&'static str, f64>> {
        CudaBackend::profile_step(self, input)
    }
    fn device(&self) -> serde_json::Value {
        serde_json::json!({"gpu": self.device_name(), "driver_cuda": CudaBackend::driver_version()})
    }
    fn method(&self) -> String {
        let attention = match self.kernels() {
            KernelSet::V2 => format!(
                "kernels v2: rotary and KV-cache write in one kernel (so `attn_kv_cache_save` is 0), tensor-core paged_decode ({} K/V tile(s) in flight per warp) and flash_prefill for prefill chunks of 64 tokens or more, over 16-token blocks",
                self.decode_stages()
            ),
            KernelSet::V1 => "kernels v1: scalar paged attention over 16-token blocks, prefill chunks of 64 tokens or more as cuBLAS GEMMs".into(),
        };
        let gemms = if self.tuned_gemm() {
            "projections of steps of at most 128 tokens through cuBLASLt with the algorithm chosen by timing in the warm-up round (VAJRA_CUDA_GEMM=tuned), larger ones through cuBLAS"
        } else {
            "cuBLAS GEMMs"
        };
        format!(
            "vajra-engine's CUDA backend, bf16: {gemms}, NVRTC kernels (residual add fused into RMSNorm, so `add` is 0), {attention}; CUDA events between operators"
        )
    }
}
