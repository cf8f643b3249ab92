//! Picking tokens on the device: greedy (`argmax_rows`) and sampled (`sample_rows`).

use super::*;

impl CudaBackend {
    /// The index of the largest of each of the first `r` rows of `logits`, computed on the
    /// device (only the ids come back).
    pub(super) fn argmax(&self, logits: &CudaSlice<f32>, r: usize) -> Result<Vec<u32>> {
        self.row_tokens(&self.k.argmax_rows, logits, r, None)
    }

    /// The token of each of the first `r` rows of `logits`, drawn on the device with
    /// `draws[row]` (only the ids come back).
    pub(super) fn sample(
        &self,
        logits: &CudaSlice<f32>,
        r: usize,
        draws: &[DeviceDraw],
    ) -> Result<Vec<u32>> {
        crate::backend::check_draws(draws.len(), r)?;
        if r == 0 {
            return Ok(Vec::new());
        }
        let words: Vec<u32> = draws.iter().flat_map(DeviceDraw::words).collect();
        let params = self.stream.clone_htod(&words).map_err(err)?;
        self.row_tokens(&self.k.sample_rows, logits, r, Some(&params))
    }

    /// Runs `kernel` (`argmax_rows`, or `sample_rows` with its `params`) with a block of
    /// [`ARGMAX_THREADS`] (or [`SAMPLE_THREADS`]) threads on each of the first `r` rows of
    /// `logits` and copies back the one id per row it writes.
    pub(super) fn row_tokens(
        &self,
        kernel: &CudaFunction,
        logits: &CudaSlice<f32>,
        r: usize,
        params: Option<&CudaSlice<u32>>,
    ) -> Result<Vec<u32>> {
        if r == 0 {
            return Ok(Vec::new());
        }
        let mut ids = self.stream.alloc_zeros::<i32>(r).map_err(err)?;
        let vocab = self.spec.config.vocab_size as i32;
        let threads = if params.is_some() {
            SAMPLE_THREADS
        } else {
            ARGMAX_THREADS
        };
        // SAFETY: argmax_rows(const float*, int vocab, int* out) and sample_rows(const float*,
        // int vocab, const unsigned* params, int* out), over r rows of `logits`, `params`
        // holding 8 words a row.
        unsafe {
            let mut b = self.stream.launch_builder(kernel);
            b.arg(logits).arg(&vocab);
            if let Some(p) = params {
                b.arg(p);
            }
            b.arg(&mut ids);
            b.launch(LaunchConfig {
                grid_dim: (r as u32, 1, 1),
                block_dim: (threads, 1, 1),
                shared_mem_bytes: 0,
            })
            .map_err(err)?;
        }
        let host = self.stream.clone_dtoh(&ids).map_err(err)?;
        Ok(host.into_iter().map(|i| i as u32).collect())
    }

    /// Draws a token from each row of `logits` (a host copy) on the device: the GPU tests hold
    /// `sample_rows` to [`crate::sampler::gumbel::draw`] with this.
    ///
    /// # Errors
    /// A row count other than `draws.len()`, or a device failure.
    pub fn sample_logits(&self, logits: &Logits, draws: &[DeviceDraw]) -> Result<Vec<u32>> {
        if logits.vocab != self.spec.config.vocab_size as usize {
            return Err(err(CudaError::Unsupported(format!(
                "logits rows of {} values for a vocabulary of {}",
                logits.vocab, self.spec.config.vocab_size
            ))));
        }
        let d = self.stream.clone_htod(&logits.data).map_err(err)?;
        self.sample(&d, logits.rows(), draws)
    }
}
