//! CUDA graphs of decode steps: capture sizes, the graphs' buffers, capture and replay.

use super::*;

/// Batch sizes a decode step is padded to for its CUDA graph (as vLLM's capture sizes: 1, 2,
/// 4, then every multiple of 8), up to [`GRAPH_MAX_BATCH`]; larger decode steps run eagerly.
pub(super) const GRAPH_BATCHES: [usize; 19] = [
    1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 72, 80, 88, 96, 104, 112, 120, 128,
];
/// The largest decode batch replayed from a CUDA graph.
pub(super) const GRAPH_MAX_BATCH: usize = GRAPH_BATCHES[GRAPH_BATCHES.len() - 1];

/// Counts of the decode steps that went through CUDA graphs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GraphStats {
    /// Graphs captured (one per (padded batch, split-K partitions) pair seen).
    pub captured: u64,
    /// Steps replayed from a captured graph.
    pub replayed: u64,
    /// Why graphs were turned off, if a capture (or the graphs' buffers) failed.
    pub failure: Option<String>,
}

/// The CUDA graphs of decode steps and the buffers they all run on. The graphs hold these
/// buffers' addresses, so the buffers live as long as the graphs; one set serves every batch
/// size (a step uses the first rows), since one step runs at a time.
pub(super) struct DecodeGraphs {
    /// By (padded batch, split-K partitions): the two numbers a decode step's launches depend
    /// on besides the buffers. Dropped before the buffers.
    pub(super) graphs: HashMap<(usize, u32), CudaGraph>,
    /// Block-table columns: enough for `max_model_len` (or the whole cache, if smaller).
    pub(super) max_blocks: usize,
    pub(super) bufs: StepBuffers,
}

impl DecodeGraphs {
    pub(super) fn new(b: &CudaBackend) -> Result<Self> {
        let c = &b.spec.config;
        let bs = b.shape.block_size as usize;
        let cap = (c.max_model_len as usize).min(b.shape.num_blocks as usize * bs);
        let max_blocks = cap.div_ceil(bs).max(1);
        // Split-K partials: the most any captured batch can need (its splits at the longest
        // context a table of `max_blocks` holds, which may pass `cap` by up to a block).
        let longest = (max_blocks * bs).min(u32::MAX as usize) as u32;
        let ws_parts = GRAPH_BATCHES
            .iter()
            .map(|&n| n * c.num_heads as usize * b.decode_splits(n, longest, true) as usize)
            .max()
            .unwrap_or(1);
        let ints = b
            .stream
            .alloc_zeros::<i32>(StepPlan::ints_len(GRAPH_MAX_BATCH, max_blocks))
            .map_err(err)?;
        let bufs = StepBuffers::new(
            &b.stream,
            c,
            ints,
            GRAPH_MAX_BATCH,
            GRAPH_MAX_BATCH,
            ws_parts,
            GRAPH_MAX_BATCH * c.num_kv_heads as usize,
        )?;
        Ok(DecodeGraphs {
            bufs,
            max_blocks,
            graphs: HashMap::new(),
        })
    }
}

impl CudaBackend {
    /// The captured batch size a step would replay as a CUDA graph, if graphs are on and the
    /// step qualifies: every request decodes one token and samples it, at most the largest
    /// captured batch, block tables within the graphs' width, v2's decode kernel, not profiling.
    pub(super) fn graph_batch(&mut self, input: &StepInput<'_>) -> Option<usize> {
        if !self.graph_mode || self.marks.borrow().is_some() || self.decode_kernel().is_none() {
            return None;
        }
        let n = input.seqs.len();
        let decode = input
            .seqs
            .iter()
            .all(|s| s.tokens.len() == 1 && (s.sample || input.logits_for == LogitsFor::AllTokens));
        if n == 0 || !decode {
            return None;
        }
        let batch = GRAPH_BATCHES.iter().copied().find(|&b| b >= n)?;
        if self.graphs.is_none() {
            match DecodeGraphs::new(self) {
                Ok(g) => self.graphs = Some(g),
                Err(e) => {
                    let why = format!("the graphs' buffers could not be allocated ({e})");
                    tracing::warn!("CUDA graphs off: {why}");
                    self.graph_stats.failure = Some(why);
                    self.graph_mode = false;
                    return None;
                }
            }
        }
        let width = self.graphs.as_ref().map_or(0, |g| g.max_blocks);
        input
            .seqs
            .iter()
            .all(|s| s.block_table.len() <= width)
            .then_some(batch)
    }

    /// Runs a decode step of `input.seqs.len()` requests padded to `batch` rows from its CUDA
    /// graph. A (batch, split-K) pair seen for the first time runs eagerly on the graphs'
    /// buffers (which also loads every kernel it needs), and its launches are then captured for
    /// the next steps; a failed capture turns graphs off (with a warning) and keeps the eager
    /// result.
    pub(super) fn replay_decode(
        &mut self,
        g: &mut DecodeGraphs,
        input: &StepInput<'_>,
        batch: usize,
    ) -> Result<()> {
        let bs = self.shape.block_size as usize;
        let plan = StepPlan::new(input, bs, Some((batch, g.max_blocks)));
        let splits = self.decode_splits(batch, plan.max_ctx, true);
        // The graph's kernels read the index arrays at fixed addresses: copy this step's there
        // (stream-ordered after the previous step, before the graph).
        self.stream
            .memcpy_htod(&plan.ints, &mut g.bufs.ints)
            .map_err(err)?;
        if let Some(graph) = g.graphs.get(&(batch, splits)) {
            graph.launch().map_err(err)?;
            self.graph_stats.replayed += 1;
            return Ok(());
        }
        self.launch_step(&plan, splits, &mut g.bufs)?;
        // The capture records the launches without running them: the eager run above is this
        // step's result. Once begun, the capture must end whatever happens inside it.
        let captured = self
            .stream
            .begin_capture(
                cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
            )
            .map_err(err)
            .and_then(|()| {
                let launched = self.launch_step(&plan, splits, &mut g.bufs);
                let ended = self
                    .stream
                    .end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0))
                    .map_err(err);
                match (launched, ended) {
                    (Err(e), _) | (_, Err(e)) => Err(e),
                    (Ok(()), Ok(None)) => Err(err(CudaError::EmptyCapture)),
                    (Ok(()), Ok(Some(graph))) => graph.upload().map_err(err).map(|()| graph),
                }
            });
        match captured {
            Ok(graph) => {
                g.graphs.insert((batch, splits), graph);
                self.graph_stats.captured += 1;
            }
            Err(e) => {
                tracing::warn!(
                    batch,
                    splits,
                    "CUDA graph capture failed ({e}); decode steps run without graphs"
                );
                self.graph_stats.failure =
                    Some(format!("capture of batch {batch}, {splits} splits: {e}"));
                self.graph_mode = false;
            }
        }
        Ok(())
    }
}
