//! The forward pass: a step's plan uploaded once, then every launch from embedding to LM head.

use super::*;

impl CudaBackend {
    /// Runs the forward pass, then `read` on the f32 logits it left on the device (the first
    /// `rows` rows of the buffer are this step's).
    pub(super) fn forward<R>(
        &mut self,
        input: &StepInput<'_>,
        read: impl FnOnce(&Self, &CudaSlice<f32>, usize) -> Result<R>,
    ) -> Result<R> {
        let vocab = self.spec.config.vocab_size;
        input
            .check(self.shape.num_blocks, self.shape.block_size, vocab)
            .map_err(|m| err(CudaError::Unsupported(m)))?;
        if let Some(batch) = self.graph_batch(input) {
            let mut g = self.graphs.take().expect("graph_batch found the graphs");
            let run = self.replay_decode(&mut g, input, batch);
            let out = run.and_then(|()| read(self, &g.bufs.logits, input.seqs.len()));
            // A failed capture turned graphs off: their buffers go too.
            if self.graph_mode {
                self.graphs = Some(g);
            }
            return out;
        }
        let plan = StepPlan::new(input, self.shape.block_size as usize, None);
        if plan.t > 65_535 {
            return Err(err(CudaError::Unsupported(format!(
                "{} tokens in one step: at most 65535 (a CUDA grid dimension)",
                plan.t
            ))));
        }
        let mma = self.decode_kernel().is_some();
        let splits = self.decode_splits(plan.listed, plan.max_ctx, mma);
        let c = &self.spec.config;
        let ws_parts = if splits > 1 {
            plan.t * c.num_heads as usize * splits as usize
        } else {
            1
        };
        // paged_decode's finished-split counters per (token, KV head); one unused element
        // where nothing counts.
        let done = if splits > 1 && mma {
            plan.t * c.num_kv_heads as usize
        } else {
            1
        };
        let ints = self.stream.clone_htod(&plan.ints).map_err(err)?;
        let mut bufs = StepBuffers::new(&self.stream, c, ints, plan.t, plan.rows, ws_parts, done)?;
        self.launch_step(&plan, splits, &mut bufs)?;
        read(self, &bufs.logits, plan.rows)
    }

    /// Launches a whole step, embedding to LM head, over `bufs`, whose `ints` already hold
    /// `plan`'s index arrays. It allocates nothing and waits on nothing unless v1's chunk
    /// attention runs (`gemm_attention` allocates), so a decode step's launches can be
    /// captured into a CUDA graph as they are.
    pub(super) fn launch_step(
        &mut self,
        plan: &StepPlan,
        splits: u32,
        bufs: &mut StepBuffers,
    ) -> Result<()> {
        let d = self.dims();
        let st = self.stream.clone();
        let StepBuffers {
            ints,
            x,
            hn,
            qkv,
            attn,
            proj,
            gu,
            act,
            sel,
            ws_acc,
            ws_ml,
            done,
            logits,
        } = bufs;
        let v = Views {
            ids: ints.slice(plan.part(Part::Ids)),
            pos: ints.slice(plan.part(Part::Pos)),
            seq: ints.slice(plan.part(Part::Seq)),
            slots: ints.slice(plan.part(Part::Slots)),
            list: ints.slice(plan.part(Part::List)),
            rows: ints.slice(plan.part(Part::Rows)),
            tables: ints.slice(plan.part(Part::Tables)),
        };
        let mut a = Acts {
            x,
            hn,
            qkv,
            attn,
            proj,
            gu,
            act,
            ws_acc,
            ws_ml,
            done,
        };
        let (t, r) = (plan.t, plan.rows);
        // SAFETY (every launch in this file): argument lists match the kernel signatures in
        // kernels/, and every buffer holds at least the t rows (or r rows) it is launched over.
        unsafe {
            let mut b = st.launch_builder(&self.k.embed);
            b.arg(&v.ids).arg(&self.embed).arg(&mut *a.x).arg(&d.h_i);
            b.launch(rows_cfg(t)).map_err(err)?;
        }
        self.mark("emb")?;
        for l in 0..self.layers.len() {
            self.attention_layer(l, plan, splits, &d, &v, &mut a)?;
            self.mlp_layer(l, t, &d, &mut a)?;
        }
        // Last residual add (the normed output is unused), then the final norm of the rows wanted.
        unsafe {
            let mut b = st.launch_builder(&self.k.add_rms_norm);
            b.arg(&mut *a.x)
                .arg(&*a.proj)
                .arg(&self.final_norm)
                .arg(&mut *a.hn)
                .arg(&d.h_i)
                .arg(&d.eps);
            b.launch(norm_cfg(t)).map_err(err)?;
            let mut b = st.launch_builder(&self.k.rms_norm_rows);
            b.arg(&*a.x)
                .arg(&v.rows)
                .arg(&self.final_norm)
                .arg(&mut *sel)
                .arg(&d.h_i)
                .arg(&d.eps);
            if r > 0 {
                b.launch(norm_cfg(r)).map_err(err)?;
            }
        }
        self.mark("final_norm")?;
        if r > 0 {
            let head = self.lm_head.as_ref().unwrap_or(&self.embed);
            self.gemm_logits(sel, r, d.h, head, d.vocab, logits)?;
        }
        self.mark("lm_head")?;
        Ok(())
    }

    /// The model's dimensions as the launches pass them.
    fn dims(&self) -> Dims {
        let c = &self.spec.config;
        let (h, hd) = (c.hidden_size as usize, c.head_dim as usize);
        let (nh, nkv) = (c.num_heads as usize, c.num_kv_heads as usize);
        let (q_w, kv_w) = (nh * hd, nkv * hd);
        let qkv_w = q_w + 2 * kv_w;
        let inter = c.intermediate_size as usize;
        let scale = 1.0 / (hd as f32).sqrt();
        Dims {
            h,
            hd,
            nh,
            nkv,
            q_w,
            inter,
            vocab: c.vocab_size as usize,
            eps: c.rms_norm_eps as f32,
            h_i: h as i32,
            qkv_i: qkv_w as i32,
            q_i: q_w as i32,
            kv_i: kv_w as i32,
            inter_i: inter as i32,
            hd_i: hd as i32,
            nh_i: nh as i32,
            nkv_i: nkv as i32,
            bs_i: self.shape.block_size as i32,
            scale,
            scale_log2: std::f32::consts::LOG2_E * scale,
            window: self.spec.sliding_window.map_or(0, |w| w as i32),
        }
    }

    /// Layer `l`'s attention half: input norm (adding the previous layer's output), QKV
    /// projection (and bias), rotary and cache write, attention, O projection into `proj`.
    fn attention_layer(
        &mut self,
        l: usize,
        plan: &StepPlan,
        splits: u32,
        d: &Dims,
        v: &Views<'_>,
        a: &mut Acts<'_>,
    ) -> Result<()> {
        let st = self.stream.clone();
        let t = plan.t;
        let null = 0u64;
        unsafe {
            let mut b = st.launch_builder(&self.k.add_rms_norm);
            b.arg(&mut *a.x);
            if l == 0 {
                b.arg(&null);
            } else {
                b.arg(&*a.proj);
            }
            b.arg(&self.layers[l].attn_norm)
                .arg(&mut *a.hn)
                .arg(&d.h_i)
                .arg(&d.eps);
            b.launch(norm_cfg(t)).map_err(err)?;
        }
        self.mark("input_layernorm")?;
        let layer = &self.layers[l];
        self.gemm(a.hn, t, d.h, &layer.qkv, d.q_w + 2 * d.nkv * d.hd, a.qkv)?;
        if let Some(bias) = &layer.qkv_bias {
            unsafe {
                let mut b = st.launch_builder(&self.k.add_bias);
                b.arg(&mut *a.qkv).arg(bias).arg(&d.qkv_i);
                b.launch(rows_cfg(t)).map_err(err)?;
            }
        }
        self.mark("attn_pre_proj")?;
        self.rope_and_cache_write(l, t, d, v, a)?;
        self.mark("attn_kv_cache_save")?;
        let flash = self.mma_kernel(&self.k.flash_prefill).cloned();
        for ch in &plan.chunks {
            match &flash {
                Some(f) => {
                    self.flash_attention(f, l, a.qkv, a.attn, &v.tables, plan.max_blocks, ch)?;
                }
                None => self.gemm_attention(l, a.qkv, a.attn, &v.tables, plan.max_blocks, ch)?,
            }
        }
        if plan.listed > 0 {
            self.token_attention(l, plan, splits, d, v, a)?;
        }
        self.mark("attn")?;
        self.gemm(a.attn, t, d.q_w, &self.layers[l].o, d.h, a.proj)?;
        self.mark("attn_post_proj")?;
        Ok(())
    }

    /// Rotary embedding of Q and K and the write of K and V into layer `l`'s cache slots: one
    /// `rope_kv_write` (v2), or `rope` then `kv_write` (v1).
    fn rope_and_cache_write(
        &mut self,
        l: usize,
        t: usize,
        d: &Dims,
        v: &Views<'_>,
        a: &mut Acts<'_>,
    ) -> Result<()> {
        let st = self.stream.clone();
        let rot_heads = (d.nh + d.nkv) as u32;
        let pair_threads = (d.hd as u32 / 2).div_ceil(32) * 32;
        if self.kernel_set == KernelSet::V2 {
            // One launch rotates Q and K and stores K and V (the profile's KV-save is 0).
            unsafe {
                let mut b = st.launch_builder(&self.k.rope_kv_write);
                b.arg(&mut *a.qkv)
                    .arg(&v.pos)
                    .arg(&self.inv_freq)
                    .arg(&v.slots)
                    .arg(&mut self.k_cache[l])
                    .arg(&mut self.v_cache[l])
                    .arg(&d.qkv_i)
                    .arg(&d.nh_i)
                    .arg(&d.nkv_i)
                    .arg(&d.hd_i);
                b.launch(LaunchConfig {
                    grid_dim: (t as u32, rot_heads + d.nkv as u32, 1),
                    block_dim: (pair_threads, 1, 1),
                    shared_mem_bytes: 0,
                })
                .map_err(err)?;
            }
            self.mark("attn_rope")?;
            return Ok(());
        }
        unsafe {
            let mut b = st.launch_builder(&self.k.rope);
            b.arg(&mut *a.qkv)
                .arg(&v.pos)
                .arg(&self.inv_freq)
                .arg(&d.qkv_i)
                .arg(&d.hd_i);
            b.launch(LaunchConfig {
                grid_dim: (t as u32, rot_heads, 1),
                block_dim: (pair_threads, 1, 1),
                shared_mem_bytes: 0,
            })
            .map_err(err)?;
        }
        self.mark("attn_rope")?;
        unsafe {
            let mut b = st.launch_builder(&self.k.kv_write);
            b.arg(&*a.qkv)
                .arg(&mut self.k_cache[l])
                .arg(&mut self.v_cache[l])
                .arg(&v.slots)
                .arg(&d.qkv_i)
                .arg(&d.q_i)
                .arg(&d.kv_i);
            b.launch(rows_cfg(t)).map_err(err)?;
        }
        Ok(())
    }

    /// Attention of the listed tokens (decodes and short chunks) in layer `l`: v2's
    /// `paged_decode` (which merges its own split-K partials) or v1's `paged_attention_scalar`
    /// and, with splits, `attention_combine`.
    fn token_attention(
        &self,
        l: usize,
        plan: &StepPlan,
        splits: u32,
        d: &Dims,
        v: &Views<'_>,
        a: &mut Acts<'_>,
    ) -> Result<()> {
        let st = &self.stream;
        let mma_decode = self.decode_kernel();
        let decode_smem = decode_smem_bytes(d.hd as u32, self.decode_stages);
        let (listed, mb_i, splits_i) = (plan.listed, plan.max_blocks as i32, splits as i32);
        unsafe {
            let mut b = st.launch_builder(
                mma_decode
                    .as_ref()
                    .unwrap_or(&self.k.paged_attention_scalar),
            );
            b.arg(&*a.qkv)
                .arg(&self.k_cache[l])
                .arg(&self.v_cache[l])
                .arg(&mut *a.attn)
                .arg(&mut *a.ws_acc)
                .arg(&mut *a.ws_ml)
                .arg(&v.list)
                .arg(&v.seq)
                .arg(&v.pos)
                .arg(&v.tables)
                .arg(&mb_i)
                .arg(&d.bs_i)
                .arg(&d.nh_i)
                .arg(&d.nkv_i);
            // paged_decode_<hd>(…, kv_heads, scale_log2, window, done);
            // paged_attention_scalar(…, kv_heads, head_dim, qkv_width, scale, window).
            if mma_decode.is_some() {
                b.arg(&d.scale_log2).arg(&d.window).arg(&mut *a.done);
            } else {
                b.arg(&d.hd_i).arg(&d.qkv_i).arg(&d.scale).arg(&d.window);
            }
            b.launch(LaunchConfig {
                grid_dim: (listed as u32, d.nkv as u32, splits),
                block_dim: (ATT_THREADS, 1, 1),
                shared_mem_bytes: if mma_decode.is_some() { decode_smem } else { 0 },
            })
            .map_err(err)?;
            // paged_decode merges its own splits.
            if splits > 1 && mma_decode.is_none() {
                let mut b = st.launch_builder(&self.k.attention_combine);
                b.arg(&*a.ws_acc)
                    .arg(&*a.ws_ml)
                    .arg(&mut *a.attn)
                    .arg(&v.list)
                    .arg(&d.nh_i)
                    .arg(&d.hd_i)
                    .arg(&splits_i);
                b.launch(LaunchConfig {
                    grid_dim: (listed as u32, d.nh as u32, 1),
                    block_dim: (ATT_THREADS, 1, 1),
                    shared_mem_bytes: 0,
                })
                .map_err(err)?;
            }
        }
        Ok(())
    }

    /// Layer `l`'s MLP half: post-attention norm (adding the attention output), gate-up
    /// projection, SiLU-and-multiply, down projection into `proj`.
    fn mlp_layer(&self, l: usize, t: usize, d: &Dims, a: &mut Acts<'_>) -> Result<()> {
        let st = &self.stream;
        let layer = &self.layers[l];
        unsafe {
            let mut b = st.launch_builder(&self.k.add_rms_norm);
            b.arg(&mut *a.x)
                .arg(&*a.proj)
                .arg(&layer.mlp_norm)
                .arg(&mut *a.hn)
                .arg(&d.h_i)
                .arg(&d.eps);
            b.launch(norm_cfg(t)).map_err(err)?;
        }
        self.mark("post_attention_layernorm")?;
        self.gemm(a.hn, t, d.h, &layer.gate_up, 2 * d.inter, a.gu)?;
        self.mark("mlp_up_proj")?;
        unsafe {
            let (f, per_thread) = if self.kernel_set == KernelSet::V2 && d.inter.is_multiple_of(8) {
                (&self.k.silu_mul8, 8)
            } else {
                (&self.k.silu_mul, 1)
            };
            let mut b = st.launch_builder(f);
            b.arg(&*a.gu).arg(&mut *a.act).arg(&d.inter_i);
            b.launch(LaunchConfig {
                grid_dim: (
                    d.inter.div_ceil(per_thread * ROW_THREADS as usize) as u32,
                    t as u32,
                    1,
                ),
                block_dim: (ROW_THREADS, 1, 1),
                shared_mem_bytes: 0,
            })
            .map_err(err)?;
        }
        self.mark("mlp_act")?;
        self.gemm(a.act, t, d.inter, &layer.down, d.h, a.proj)?;
        self.mark("mlp_down_proj")?;
        Ok(())
    }
}

/// One block of [`ROW_THREADS`] per row, over `n` rows.
fn rows_cfg(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n as u32, 1, 1),
        block_dim: (ROW_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One block of [`NORM_THREADS`] per row, over `n` rows.
fn norm_cfg(n: usize) -> LaunchConfig {
    LaunchConfig {
        block_dim: (NORM_THREADS, 1, 1),
        ..rows_cfg(n)
    }
}

/// The model's dimensions, as sizes and as the `int`s and `float`s the kernels take.
struct Dims {
    h: usize,
    hd: usize,
    nh: usize,
    nkv: usize,
    q_w: usize,
    inter: usize,
    vocab: usize,
    eps: f32,
    h_i: i32,
    qkv_i: i32,
    q_i: i32,
    kv_i: i32,
    inter_i: i32,
    hd_i: i32,
    nh_i: i32,
    nkv_i: i32,
    bs_i: i32,
    scale: f32,
    scale_log2: f32,
    window: i32,
}

/// The step's index arrays, each a view of the one upload.
struct Views<'a> {
    ids: CudaView<'a, i32>,
    pos: CudaView<'a, i32>,
    seq: CudaView<'a, i32>,
    slots: CudaView<'a, i32>,
    list: CudaView<'a, i32>,
    rows: CudaView<'a, i32>,
    tables: CudaView<'a, i32>,
}

/// The step's activation and split-K buffers (the parts of [`StepBuffers`] the layers write).
struct Acts<'a> {
    x: &'a mut CudaSlice<f32>,
    hn: &'a mut CudaSlice<bf16>,
    qkv: &'a mut CudaSlice<bf16>,
    attn: &'a mut CudaSlice<bf16>,
    proj: &'a mut CudaSlice<bf16>,
    gu: &'a mut CudaSlice<bf16>,
    act: &'a mut CudaSlice<bf16>,
    ws_acc: &'a mut CudaSlice<f32>,
    ws_ml: &'a mut CudaSlice<f32>,
    done: &'a mut CudaSlice<i32>,
}
