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
            .map_err(err)?;
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
            return Err(err(format!(
                "{} tokens in one step: at most 65535 (a CUDA grid dimension)",
                plan.t
            )));
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
        let c = &self.spec.config;
        let (h, hd) = (c.hidden_size as usize, c.head_dim as usize);
        let (nh, nkv) = (c.num_heads as usize, c.num_kv_heads as usize);
        let (q_w, kv_w) = (nh * hd, nkv * hd);
        let qkv_w = q_w + 2 * kv_w;
        let inter = c.intermediate_size as usize;
        let vocab = c.vocab_size as usize;
        let eps = c.rms_norm_eps as f32;
        let (t, listed, r, max_blocks) = (plan.t, plan.listed, plan.rows, plan.max_blocks);
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
        let (d_ids, d_pos, d_seq, d_slots, d_list, d_rows, d_tables) = (
            ints.slice(plan.part(Part::Ids)),
            ints.slice(plan.part(Part::Pos)),
            ints.slice(plan.part(Part::Seq)),
            ints.slice(plan.part(Part::Slots)),
            ints.slice(plan.part(Part::List)),
            ints.slice(plan.part(Part::Rows)),
            ints.slice(plan.part(Part::Tables)),
        );
        let mma_decode = self.decode_kernel();
        let decode_smem = decode_smem_bytes(hd as u32, self.decode_stages);
        let flash = self.mma_kernel(&self.k.flash_prefill).cloned();
        let rows_cfg = |n: usize| LaunchConfig {
            grid_dim: (n as u32, 1, 1),
            block_dim: (ROW_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let norm_cfg = |n: usize| LaunchConfig {
            block_dim: (NORM_THREADS, 1, 1),
            ..rows_cfg(n)
        };
        let (h_i, qkv_i, q_i, kv_i, inter_i, hd_i) = (
            h as i32,
            qkv_w as i32,
            q_w as i32,
            kv_w as i32,
            inter as i32,
            hd as i32,
        );
        let rot_heads = (nh + nkv) as u32;
        let bs_i = self.shape.block_size as i32;
        let (nh_i, nkv_i, mb_i) = (nh as i32, nkv as i32, max_blocks as i32);
        let scale = 1.0 / (hd as f32).sqrt();
        let scale_log2 = std::f32::consts::LOG2_E * scale;
        let window = self.spec.sliding_window.map_or(0, |w| w as i32);
        let null = 0u64;
        let splits_i = splits as i32;

        // SAFETY (every launch below): argument lists match the kernel signatures in kernels/,
        // and every buffer holds at least the t rows (or r rows) it is launched over.
        unsafe {
            let mut b = st.launch_builder(&self.k.embed);
            b.arg(&d_ids).arg(&self.embed).arg(&mut *x).arg(&h_i);
            b.launch(rows_cfg(t)).map_err(err)?;
        }
        self.mark("emb")?;
        for l in 0..self.layers.len() {
            let layer = &self.layers[l];
            unsafe {
                let mut b = st.launch_builder(&self.k.add_rms_norm);
                b.arg(&mut *x);
                if l == 0 {
                    b.arg(&null);
                } else {
                    b.arg(&*proj);
                }
                b.arg(&layer.attn_norm).arg(&mut *hn).arg(&h_i).arg(&eps);
                b.launch(norm_cfg(t)).map_err(err)?;
            }
            self.mark("input_layernorm")?;
            self.gemm(hn, t, h, &layer.qkv, qkv_w, qkv)?;
            if let Some(bias) = &layer.qkv_bias {
                unsafe {
                    let mut b = st.launch_builder(&self.k.add_bias);
                    b.arg(&mut *qkv).arg(bias).arg(&qkv_i);
                    b.launch(rows_cfg(t)).map_err(err)?;
                }
            }
            self.mark("attn_pre_proj")?;
            let pair_threads = (hd as u32 / 2).div_ceil(32) * 32;
            if self.kernel_set == KernelSet::V2 {
                // One launch rotates Q and K and stores K and V (the profile's KV-save is 0).
                unsafe {
                    let mut b = st.launch_builder(&self.k.rope_kv_write);
                    b.arg(&mut *qkv)
                        .arg(&d_pos)
                        .arg(&self.inv_freq)
                        .arg(&d_slots)
                        .arg(&mut self.k_cache[l])
                        .arg(&mut self.v_cache[l])
                        .arg(&qkv_i)
                        .arg(&nh_i)
                        .arg(&nkv_i)
                        .arg(&hd_i);
                    b.launch(LaunchConfig {
                        grid_dim: (t as u32, rot_heads + nkv as u32, 1),
                        block_dim: (pair_threads, 1, 1),
                        shared_mem_bytes: 0,
                    })
                    .map_err(err)?;
                }
                self.mark("attn_rope")?;
            } else {
                unsafe {
                    let mut b = st.launch_builder(&self.k.rope);
                    b.arg(&mut *qkv)
                        .arg(&d_pos)
                        .arg(&self.inv_freq)
                        .arg(&qkv_i)
                        .arg(&hd_i);
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
                    b.arg(&*qkv)
                        .arg(&mut self.k_cache[l])
                        .arg(&mut self.v_cache[l])
                        .arg(&d_slots)
                        .arg(&qkv_i)
                        .arg(&q_i)
                        .arg(&kv_i);
                    b.launch(rows_cfg(t)).map_err(err)?;
                }
            }
            self.mark("attn_kv_cache_save")?;
            for ch in &plan.chunks {
                match &flash {
                    Some(f) => self.flash_attention(f, l, qkv, attn, &d_tables, max_blocks, ch)?,
                    None => self.gemm_attention(l, qkv, attn, &d_tables, max_blocks, ch)?,
                }
            }
            if listed > 0 {
                unsafe {
                    let mut b = st.launch_builder(
                        mma_decode
                            .as_ref()
                            .unwrap_or(&self.k.paged_attention_scalar),
                    );
                    b.arg(&*qkv)
                        .arg(&self.k_cache[l])
                        .arg(&self.v_cache[l])
                        .arg(&mut *attn)
                        .arg(&mut *ws_acc)
                        .arg(&mut *ws_ml)
                        .arg(&d_list)
                        .arg(&d_seq)
                        .arg(&d_pos)
                        .arg(&d_tables)
                        .arg(&mb_i)
                        .arg(&bs_i)
                        .arg(&nh_i)
                        .arg(&nkv_i);
                    // paged_decode_<hd>(…, kv_heads, scale_log2, window, done);
                    // paged_attention_scalar(…, kv_heads, head_dim, qkv_width, scale, window).
                    if mma_decode.is_some() {
                        b.arg(&scale_log2).arg(&window).arg(&mut *done);
                    } else {
                        b.arg(&hd_i).arg(&qkv_i).arg(&scale).arg(&window);
                    }
                    b.launch(LaunchConfig {
                        grid_dim: (listed as u32, nkv as u32, splits),
                        block_dim: (ATT_THREADS, 1, 1),
                        shared_mem_bytes: if mma_decode.is_some() { decode_smem } else { 0 },
                    })
                    .map_err(err)?;
                    // paged_decode merges its own splits.
                    if splits > 1 && mma_decode.is_none() {
                        let mut b = st.launch_builder(&self.k.attention_combine);
                        b.arg(&*ws_acc)
                            .arg(&*ws_ml)
                            .arg(&mut *attn)
                            .arg(&d_list)
                            .arg(&nh_i)
                            .arg(&hd_i)
                            .arg(&splits_i);
                        b.launch(LaunchConfig {
                            grid_dim: (listed as u32, nh as u32, 1),
                            block_dim: (ATT_THREADS, 1, 1),
                            shared_mem_bytes: 0,
                        })
                        .map_err(err)?;
                    }
                }
            }
            self.mark("attn")?;
            self.gemm(attn, t, q_w, &layer.o, h, proj)?;
            self.mark("attn_post_proj")?;
            unsafe {
                let mut b = st.launch_builder(&self.k.add_rms_norm);
                b.arg(&mut *x)
                    .arg(&*proj)
                    .arg(&layer.mlp_norm)
                    .arg(&mut *hn)
                    .arg(&h_i)
                    .arg(&eps);
                b.launch(norm_cfg(t)).map_err(err)?;
            }
            self.mark("post_attention_layernorm")?;
            self.gemm(hn, t, h, &layer.gate_up, 2 * inter, gu)?;
            self.mark("mlp_up_proj")?;
            unsafe {
                let (f, per_thread) = if self.kernel_set == KernelSet::V2 && inter.is_multiple_of(8)
                {
                    (&self.k.silu_mul8, 8)
                } else {
                    (&self.k.silu_mul, 1)
                };
                let mut b = st.launch_builder(f);
                b.arg(&*gu).arg(&mut *act).arg(&inter_i);
                b.launch(LaunchConfig {
                    grid_dim: (
                        inter.div_ceil(per_thread * ROW_THREADS as usize) as u32,
                        t as u32,
                        1,
                    ),
                    block_dim: (ROW_THREADS, 1, 1),
                    shared_mem_bytes: 0,
                })
                .map_err(err)?;
            }
            self.mark("mlp_act")?;
            self.gemm(act, t, inter, &layer.down, h, proj)?;
            self.mark("mlp_down_proj")?;
        }
        // Last residual add (the normed output is unused), then the final norm of the rows wanted.
        unsafe {
            let mut b = st.launch_builder(&self.k.add_rms_norm);
            b.arg(&mut *x)
                .arg(&*proj)
                .arg(&self.final_norm)
                .arg(&mut *hn)
                .arg(&h_i)
                .arg(&eps);
            b.launch(norm_cfg(t)).map_err(err)?;
            let mut b = st.launch_builder(&self.k.rms_norm_rows);
            b.arg(&*x)
                .arg(&d_rows)
                .arg(&self.final_norm)
                .arg(&mut *sel)
                .arg(&h_i)
                .arg(&eps);
            if r > 0 {
                b.launch(norm_cfg(r)).map_err(err)?;
            }
        }
        self.mark("final_norm")?;
        if r > 0 {
            let head = self.lm_head.as_ref().unwrap_or(&self.embed);
            self.gemm_logits(sel, r, h, head, vocab, logits)?;
        }
        self.mark("lm_head")?;
        Ok(())
    }
}
