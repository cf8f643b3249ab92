//! Starting the backend: the device, its stream and cuBLAS, the kernels, the weights (loaded or
//! random) and the paged cache.

use super::*;

pub(super) struct GpuLayer {
    pub(super) attn_norm: CudaSlice<bf16>,
    pub(super) qkv: CudaSlice<bf16>,
    pub(super) qkv_bias: Option<CudaSlice<bf16>>,
    pub(super) o: CudaSlice<bf16>,
    pub(super) mlp_norm: CudaSlice<bf16>,
    pub(super) gate_up: CudaSlice<bf16>,
    pub(super) down: CudaSlice<bf16>,
}

impl CudaBackend {
    /// A backend for `spec` with the given weights and cache on device 0.
    ///
    /// # Errors
    /// As [`CudaBackend::load`].
    pub fn new(spec: ModelSpec, weights: WeightSource<'_>, shape: CacheShape) -> Result<Self> {
        probe().map_err(err)?;
        let ctx = CudaContext::new(0).map_err(err)?;
        // One stream does all the work, so cudarc's per-argument event tracking (for safety
        // across streams) is pure overhead: it recorded events on every kernel argument, which
        // made small decode kernels launch-bound (measured: 15–40 µs per launch).
        // SAFETY: every buffer of this backend is used on `stream` only.
        unsafe { ctx.disable_event_tracking() };
        let kernel_set = KernelSet::from_env()?;
        let (major, minor) = ctx.compute_capability().map_err(err)?;
        let sms = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(err)?
            .max(1) as u32;
        let arch: &'static str = Box::leak(format!("sm_{major}{minor}").into_boxed_str());
        let device_name = ctx.name().map_err(err)?;
        if ctx.has_async_alloc() {
            // Eager steps allocate and free their buffers through the device's stream-ordered
            // pool, whose default release threshold (0) hands freed memory back to the driver
            // at every synchronisation, so each step would map it again. Keep it pooled.
            let mut pool: cudarc::driver::sys::CUmemoryPool = std::ptr::null_mut();
            let mut keep = u64::MAX;
            // SAFETY: `pool` receives the device's default pool; the attribute takes a u64.
            unsafe {
                cudarc::driver::sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device())
                    .result()
                    .map_err(err)?;
                cudarc::driver::sys::cuMemPoolSetAttribute(
                    pool,
                    cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                    (&mut keep as *mut u64).cast(),
                )
                .result()
                .map_err(err)?;
            }
        }
        // A stream of our own: the legacy default stream cannot be captured into a graph.
        let stream = ctx.new_stream().map_err(err)?;
        let blas = CudaBlas::new(stream.clone()).map_err(err)?;
        // A workspace of our own (32 MiB, what cuBLAS asks for on Hopper), so that no cuBLAS
        // call allocates one inside a graph capture.
        let blas_workspace = stream.alloc_zeros::<u8>(CUBLAS_WORKSPACE).map_err(err)?;
        {
            let (wp, _g) = blas_workspace.device_ptr(&stream);
            // SAFETY: the buffer outlives the handle's use of it (both live in the backend, the
            // workspace dropped after the handle), and holds CUBLAS_WORKSPACE bytes.
            unsafe {
                cudarc::cublas::sys::cublasSetWorkspace_v2(
                    *blas.handle(),
                    wp as *mut std::ffi::c_void,
                    CUBLAS_WORKSPACE,
                )
            }
            .result()
            .map_err(err)?;
        }
        let graph_mode = env_choice("VAJRA_CUDA_GRAPHS", &[("off", false), ("on", true)], false)?;
        let tuned = if env_choice(
            "VAJRA_CUDA_GEMM",
            &[("cublas", false), ("tuned", true)],
            false,
        )? {
            Some(RefCell::new(TunedGemm::new()?))
        } else {
            None
        };
        let device_sampler = env_choice(
            "VAJRA_CUDA_SAMPLER",
            &[("host", false), ("device", true)],
            false,
        )?;
        let split_aim = match std::env::var("VAJRA_CUDA_SPLIT_BLOCKS_PER_SM") {
            Err(std::env::VarError::NotPresent) => SplitAim::PerSm(DEFAULT_SPLIT_BLOCKS_PER_SM),
            Ok(v) => v.parse::<SplitAim>().map_err(|_| {
                EngineError::invalid("VAJRA_CUDA_SPLIT_BLOCKS_PER_SM", &v, SPLIT_AIMS)
            })?,
            Err(e) => {
                return Err(EngineError::invalid(
                    "VAJRA_CUDA_SPLIT_BLOCKS_PER_SM",
                    e.to_string(),
                    SPLIT_AIMS,
                ));
            }
        };
        let mut funcs = HashMap::new();
        for (name, ptx) in compile_kernels(arch)? {
            let module = ctx
                .load_module(ptx)
                .map_err(|e| err(format!("loading kernels/{name}: {e}")))?;
            for f in kernel_names(name) {
                funcs.insert(
                    *f,
                    module
                        .load_function(f)
                        .map_err(|e| err(format!("kernel {f}: {e}")))?,
                );
            }
        }
        let take = |n: &str| funcs.get(n).cloned().expect("every kernel name is loaded");
        let k = Kernels {
            embed: take("embed"),
            add_rms_norm: take("add_rms_norm"),
            rms_norm_rows: take("rms_norm_rows"),
            add_bias: take("add_bias"),
            rope: take("rope"),
            kv_write: take("kv_write"),
            rope_kv_write: take("rope_kv_write"),
            silu_mul: take("silu_mul"),
            silu_mul8: take("silu_mul8"),
            fill_uniform: take("fill_uniform"),
            paged_attention_scalar: take("paged_attention_scalar"),
            paged_decode: MMA_HEAD_DIMS
                .iter()
                .map(|d| take(&format!("paged_decode_{d}")))
                .collect(),
            paged_decode2: MMA_HEAD_DIMS
                .iter()
                .map(|d| take(&format!("paged_decode2_{d}")))
                .collect(),
            flash_prefill: MMA_HEAD_DIMS
                .iter()
                .map(|d| take(&format!("flash_prefill_{d}")))
                .collect(),
            attention_combine: take("attention_combine"),
            gather_kv: take("gather_kv"),
            causal_softmax: take("causal_softmax"),
            argmax_rows: take("argmax_rows"),
            sample_rows: take("sample_rows"),
        };
        if major >= 8 {
            // Two-stage decode tiles exceed the 48 KB of shared memory a block gets by default.
            for (f, d) in k.paged_decode2.iter().zip(MMA_HEAD_DIMS) {
                f.set_attribute(
                    cudarc::driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    decode_smem_bytes(d, 2) as i32,
                )
                .map_err(err)?;
            }
        }
        let decode_stages = env_choice("VAJRA_CUDA_DECODE_STAGES", &[("1", 1), ("2", 2)], 1)?;
        let c = &spec.config;
        if c.num_heads / c.num_kv_heads > 8 || c.head_dim > 256 {
            return Err(err(format!(
                "{} query heads per KV head and head_dim {}: the attention kernel takes at most 8 and 256",
                c.num_heads / c.num_kv_heads,
                c.head_dim
            )));
        }
        let (h, v, i) = (
            c.hidden_size as usize,
            c.vocab_size as usize,
            c.intermediate_size as usize,
        );
        let (q, kv) = (c.q_width() as usize, c.kv_width() as usize);
        let up = |x: &[f32]| -> Result<CudaSlice<bf16>> {
            let b: Vec<bf16> = x.iter().map(|&f| bf16::from_f32(f)).collect();
            stream.clone_htod(&b).map_err(err)
        };
        let mut seed_counter = 0u64;
        let mut rand = |n: usize, scale: f32, seed: u64| -> Result<CudaSlice<bf16>> {
            let mut s = stream.alloc_zeros::<bf16>(n).map_err(err)?;
            seed_counter += 1;
            let (n64, sd) = (
                n as u64,
                seed.wrapping_mul(1_000_003).wrapping_add(seed_counter),
            );
            let mut b = stream.launch_builder(&k.fill_uniform);
            b.arg(&mut s).arg(&n64).arg(&sd).arg(&scale);
            // SAFETY: fill_uniform(bf16*, u64 n, u64 seed, float) writes n elements of `s`.
            unsafe {
                b.launch(LaunchConfig {
                    grid_dim: (1024, 1, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                })
            }
            .map_err(err)?;
            Ok(s)
        };
        let (embed, lm_head, final_norm, layers) = match weights {
            WeightSource::Loaded(w) => {
                let layers = w
                    .layers
                    .iter()
                    .map(|l| {
                        Ok(GpuLayer {
                            attn_norm: up(&l.attn_norm)?,
                            qkv: up(&l.qkv)?,
                            qkv_bias: l.qkv_bias.as_deref().map(up).transpose()?,
                            o: up(&l.o)?,
                            mlp_norm: up(&l.mlp_norm)?,
                            gate_up: up(&l.gate_up)?,
                            down: up(&l.down)?,
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                (
                    up(&w.embed)?,
                    w.lm_head.as_deref().map(up).transpose()?,
                    up(&w.final_norm)?,
                    layers,
                )
            }
            WeightSource::Random { seed } => {
                let wscale = 1.0 / (h as f32).sqrt();
                let layers = (0..c.num_layers)
                    .map(|_| {
                        Ok(GpuLayer {
                            attn_norm: rand(h, 1.0, seed)?,
                            qkv: rand((q + 2 * kv) * h, wscale, seed)?,
                            qkv_bias: if c.attention_bias {
                                Some(rand(q + 2 * kv, 0.1, seed)?)
                            } else {
                                None
                            },
                            o: rand(h * q, wscale, seed)?,
                            mlp_norm: rand(h, 1.0, seed)?,
                            gate_up: rand(2 * i * h, wscale, seed)?,
                            down: rand(h * i, 1.0 / (i as f32).sqrt(), seed)?,
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                let head = if c.tie_word_embeddings {
                    None
                } else {
                    Some(rand(v * h, wscale, seed)?)
                };
                (rand(v * h, 1.0, seed)?, head, rand(h, 1.0, seed)?, layers)
            }
        };
        let inv: Vec<f32> = spec.rope_inv_freq().iter().map(|&f| f as f32).collect();
        let inv_freq = stream.clone_htod(&inv).map_err(err)?;
        let per_layer = shape.num_blocks as usize * shape.block_size as usize * kv;
        let host = shape.num_host_blocks as usize * shape.block_size as usize * kv;
        let mut k_cache = Vec::new();
        let mut v_cache = Vec::new();
        for _ in 0..c.num_layers {
            k_cache.push(stream.alloc_zeros::<bf16>(per_layer).map_err(err)?);
            v_cache.push(stream.alloc_zeros::<bf16>(per_layer).map_err(err)?);
        }
        stream.synchronize().map_err(err)?;
        tracing::info!(device = %device_name, arch, blocks = shape.num_blocks, "cuda backend ready");
        let mut b = CudaBackend {
            k_host: vec![vec![bf16::ZERO; host]; c.num_layers as usize],
            v_host: vec![vec![bf16::ZERO; host]; c.num_layers as usize],
            spec,
            shape,
            device_name,
            stream,
            blas,
            tuned,
            blas_workspace,
            k,
            embed,
            lm_head,
            final_norm,
            layers,
            inv_freq,
            k_cache,
            v_cache,
            marks: RefCell::new(None),
            kernel_set,
            decode_stages,
            sms,
            split_aim,
            decode_resident: 1,
            cc_major: major,
            graph_mode,
            device_sampler,
            graphs: None,
            graph_stats: GraphStats::default(),
        };
        b.decode_resident = b.decode_occupancy();
        Ok(b)
    }
}
