//! Attention launches: flash_prefill per long chunk, the GEMM path of v1, and split-K sizing of
//! the per-token kernel.

use super::*;

impl CudaBackend {
    /// Attention of one long prefill chunk with `flash_prefill_<head_dim>`: K/V read from the
    /// paged cache through the request's block table, output into the chunk's rows of `attn`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn flash_attention(
        &self,
        f: &CudaFunction,
        layer: usize,
        qkv: &CudaSlice<bf16>,
        attn: &mut CudaSlice<bf16>,
        tables: &CudaView<'_, i32>,
        max_blocks: usize,
        ch: &GemmChunk,
    ) -> Result<()> {
        let c = &self.spec.config;
        let (hd, nh, nkv) = (c.head_dim, c.num_heads, c.num_kv_heads);
        let table = tables.slice(ch.seq * max_blocks..(ch.seq + 1) * max_blocks);
        let (bs_i, first, tq, start) = (
            self.shape.block_size as i32,
            ch.first as i32,
            ch.len as i32,
            ch.context as i32,
        );
        let window = self.spec.sliding_window.map_or(0, |w| w as i32);
        let (nh_i, nkv_i, qkv_w) = (nh as i32, nkv as i32, ((nh + 2 * nkv) * hd) as i32);
        let scale_log2 = std::f32::consts::LOG2_E / (hd as f32).sqrt();
        // SAFETY: flash_prefill_<hd>(qkv, k_cache, v_cache, table, block_size, out, first, tq,
        // start, window, q_heads, kv_heads, qkv_width, scale_log2) over (⌈tq/64⌉, q_heads)
        // blocks of 128 threads; qkv and attn hold the step's rows, the table this request's.
        unsafe {
            let mut b = self.stream.launch_builder(f);
            b.arg(qkv)
                .arg(&self.k_cache[layer])
                .arg(&self.v_cache[layer])
                .arg(&table)
                .arg(&bs_i)
                .arg(attn)
                .arg(&first)
                .arg(&tq)
                .arg(&start)
                .arg(&window)
                .arg(&nh_i)
                .arg(&nkv_i)
                .arg(&qkv_w)
                .arg(&scale_log2);
            b.launch(LaunchConfig {
                grid_dim: ((ch.len as u32).div_ceil(64), nh, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            })
            .map_err(err)?;
        }
        Ok(())
    }

    /// `batch` column-major products `C_i = alpha · op(A_i) · B_i` (m × n, inner k), f32
    /// compute, `op` transposing A or not; operand `i` starts `stride` elements after `i − 1`.
    ///
    /// # Safety
    /// Each operand's pointer addresses a live device buffer holding what its leading dimension,
    /// stride and `batch` reach for these sizes.
    #[allow(clippy::too_many_arguments)]
    unsafe fn strided_batched(
        &self,
        op_a: cublasOperation_t,
        (m, n, k): (usize, usize, usize),
        alpha: f32,
        a: Strided,
        b: Strided,
        c: Strided,
        batch: usize,
    ) -> Result<()> {
        let zero = 0.0f32;
        // SAFETY: the caller's promise; alpha and beta are f32 as the compute type asks.
        unsafe {
            cudarc::cublas::result::gemm_strided_batched_ex(
                *self.blas.handle(),
                op_a,
                cublasOperation_t::CUBLAS_OP_N,
                m as i32,
                n as i32,
                k as i32,
                (&alpha) as *const f32 as *const _,
                a.ptr as *const _,
                a.ty,
                a.ld,
                a.stride,
                b.ptr as *const _,
                b.ty,
                b.ld,
                b.stride,
                (&zero) as *const f32 as *const _,
                c.ptr as *mut _,
                c.ty,
                c.ld,
                c.stride,
                batch as i32,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(err)
    }

    /// Attention of one long prefill chunk as GEMMs (tensor cores): gather the request's
    /// context K/V from the paged cache into contiguous buffers, then per KV head
    /// `S = scale · Q Kᵀ` (f32, batched over the group's query heads), a causal softmax into
    /// bf16 `P`, and `O = P V` written straight into the chunk's rows of `attn`.
    pub(super) fn gemm_attention(
        &self,
        layer: usize,
        qkv: &CudaSlice<bf16>,
        attn: &mut CudaSlice<bf16>,
        tables: &CudaView<'_, i32>,
        max_blocks: usize,
        ch: &GemmChunk,
    ) -> Result<()> {
        let c = &self.spec.config;
        let st = &self.stream;
        let (hd, nh, nkv) = (
            c.head_dim as usize,
            c.num_heads as usize,
            c.num_kv_heads as usize,
        );
        let group = nh / nkv;
        let (q_w, qkv_w) = (nh * hd, (nh + 2 * nkv) * hd);
        let (tq, ctx) = (ch.len, ch.context + ch.len);
        let mut kbuf = unsafe { st.alloc::<bf16>(nkv * ctx * hd) }.map_err(err)?;
        let mut vbuf = unsafe { st.alloc::<bf16>(nkv * ctx * hd) }.map_err(err)?;
        let mut sbuf = unsafe { st.alloc::<f32>(group * tq * ctx) }.map_err(err)?;
        let mut pbuf = unsafe { st.alloc::<bf16>(group * tq * ctx) }.map_err(err)?;
        let table = tables.slice(ch.seq * max_blocks..(ch.seq + 1) * max_blocks);
        let (bs_i, nkv_i, hd_i, ctx_i, tq_i) = (
            self.shape.block_size as i32,
            nkv as i32,
            hd as i32,
            ctx as i32,
            tq as i32,
        );
        let start = ch.context as i32;
        let window = self.spec.sliding_window.map_or(0, |w| w as i32);
        // SAFETY: gather_kv(k_cache, v_cache, table, block_size, kv_heads, head_dim, ctx, k_out,
        // v_out) over (ctx, kv_heads) blocks of head_dim threads; buffers hold nkv·ctx·hd.
        unsafe {
            let mut b = st.launch_builder(&self.k.gather_kv);
            b.arg(&self.k_cache[layer])
                .arg(&self.v_cache[layer])
                .arg(&table)
                .arg(&bs_i)
                .arg(&nkv_i)
                .arg(&hd_i)
                .arg(&ctx_i)
                .arg(&mut kbuf)
                .arg(&mut vbuf);
            b.launch(LaunchConfig {
                grid_dim: (ctx as u32, nkv as u32, 1),
                block_dim: (hd as u32, 1, 1),
                shared_mem_bytes: 0,
            })
            .map_err(err)?;
        }
        let scale = 1.0f32 / (hd as f32).sqrt();
        let one = 1.0f32;
        let elem = size_of::<bf16>() as u64;
        for g in 0..nkv {
            {
                let (kp, _a) = kbuf.device_ptr(st);
                let (qp, _b) = qkv.device_ptr(st);
                let (sp, _c) = sbuf.device_ptr_mut(st);
                let k0 = kp + (g * ctx * hd) as u64 * elem;
                let q0 = qp + ((ch.first * qkv_w + g * group * hd) as u64) * elem;
                // SAFETY: Sᵀ(ctx × tq) per head = K_g(ctx × hd) · Q_hᵀ(hd × tq), column-major:
                // K_g row-major [ctx][hd] read transposed (lda = hd), Q_h rows of the fused
                // QKV (ldb = qkv_w, next head hd further), S_h contiguous (ldc = ctx).
                unsafe {
                    self.strided_batched(
                        cublasOperation_t::CUBLAS_OP_T,
                        (ctx, tq, hd),
                        scale,
                        Strided::bf16(k0, hd, 0),
                        Strided::bf16(q0, qkv_w, hd),
                        Strided::f32(sp, ctx, tq * ctx),
                        group,
                    )?;
                }
            }
            // SAFETY: causal_softmax(s, p, rows, ctx, start, window) over (tq, group) blocks.
            unsafe {
                let mut b = st.launch_builder(&self.k.causal_softmax);
                b.arg(&sbuf)
                    .arg(&mut pbuf)
                    .arg(&tq_i)
                    .arg(&ctx_i)
                    .arg(&start)
                    .arg(&window);
                b.launch(LaunchConfig {
                    grid_dim: (tq as u32, group as u32, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                })
                .map_err(err)?;
            }
            let (vp, _a) = vbuf.device_ptr(st);
            let (pp, _b) = pbuf.device_ptr(st);
            let (op, _c) = attn.device_ptr_mut(st);
            let v0 = vp + (g * ctx * hd) as u64 * elem;
            let o0 = op + ((ch.first * q_w + g * group * hd) as u64) * elem;
            // SAFETY: O_hᵀ(hd × tq) = V_gᵀ(hd × ctx) · P_hᵀ(ctx × tq), column-major: V_g
            // row-major [ctx][hd] (lda = hd), P_h row-major [tq][ctx] (ldb = ctx), O_h into the
            // chunk's rows of attn (ldc = q_w, next head hd further).
            unsafe {
                self.strided_batched(
                    cublasOperation_t::CUBLAS_OP_N,
                    (hd, tq, ctx),
                    one,
                    Strided::bf16(v0, hd, 0),
                    Strided::bf16(pp, ctx, tq * ctx),
                    Strided::bf16(o0, q_w, hd),
                    group,
                )?;
            }
        }
        Ok(())
    }

    /// The split-K partitions of a step's per-token attention: `listed` tokens, the longest
    /// context `max_ctx`; `mma` says whether v2's `paged_decode` runs (else v1's kernel).
    pub(super) fn decode_splits(&self, listed: usize, max_ctx: u32, mma: bool) -> u32 {
        let pairs = listed * self.spec.config.num_kv_heads as usize;
        match self.split_aim {
            SplitAim::Waves if mma => {
                split_count_waves(pairs, self.decode_resident * self.sms, max_ctx)
            }
            SplitAim::Waves => {
                split_count(pairs, DEFAULT_SPLIT_BLOCKS_PER_SM * self.sms, max_ctx, mma)
            }
            SplitAim::PerSm(n) => split_count(pairs, n * self.sms, max_ctx, mma),
        }
    }
}

/// Split-K partitions for `pairs` (token, KV head) pairs, aiming at `target` blocks in all, the
/// longest context `max_ctx`; `mma`: v2's `paged_decode` (else v1's kernel).
pub(super) fn split_count(pairs: usize, target: u32, max_ctx: u32, mma: bool) -> u32 {
    let pairs = pairs.clamp(1, u32::MAX as usize) as u32;
    if pairs >= target {
        1
    } else if mma {
        // About `target` blocks, but at least 64 keys (a 16-key tile for each of the block's 4
        // warps) each.
        target
            .div_ceil(pairs)
            .min(max_ctx.div_ceil(MIN_KEYS_PER_SPLIT_V2))
            .clamp(1, MAX_SPLITS)
    } else {
        max_ctx.div_ceil(KEYS_PER_SPLIT).clamp(1, MAX_SPLITS)
    }
}

/// v2's split count for `pairs` (token, KV head) pairs on `slots` resident blocks (the decode
/// kernel's occupancy × multiprocessors), the longest context `max_ctx`: with k partitions a
/// step runs ⌈pairs·k / slots⌉ waves of blocks doing 1/k of a pair's keys each, so its time goes
/// as waves / k. Fewest partitions (at least 64 keys each) after which no more cuts that by 5 %:
/// whole waves, without paying for more blocks than that buys.
pub(super) fn split_count_waves(pairs: usize, slots: u32, max_ctx: u32) -> u32 {
    let most = max_ctx.div_ceil(MIN_KEYS_PER_SPLIT_V2).clamp(1, MAX_SPLITS);
    let (pairs, slots) = (pairs.max(1) as u64, u64::from(slots.max(1)));
    let time = |k: u32| (pairs * u64::from(k)).div_ceil(slots) as f64 / f64::from(k);
    let mut best = (1, time(1));
    for k in 2..=most {
        let t = time(k);
        if t < 0.95 * best.1 {
            best = (k, t);
        }
    }
    best.0
}

/// One operand of [`CudaBackend::strided_batched`]: a device address, its element type, leading
/// dimension and the stride between the batch's matrices (elements).
struct Strided {
    ptr: u64,
    ty: cudaDataType_t,
    ld: i32,
    stride: i64,
}

impl Strided {
    fn bf16(ptr: u64, ld: usize, stride: usize) -> Self {
        Strided {
            ptr,
            ty: cudaDataType_t::CUDA_R_16BF,
            ld: ld as i32,
            stride: stride as i64,
        }
    }

    fn f32(ptr: u64, ld: usize, stride: usize) -> Self {
        Strided {
            ty: cudaDataType_t::CUDA_R_32F,
            ..Strided::bf16(ptr, ld, stride)
        }
    }
}
