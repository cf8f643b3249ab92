//! Starting the backend: the device, its stream and cuBLAS, the kernels, the weights (loaded or
//! random) and the paged cache.

use super::*;

/// One layer's weights on the device, in the fused layout of [`FusedWeights`].
pub(super) struct GpuLayer {
    pub(super) attn_norm: CudaSlice<bf16>,
    pub(super) qkv: CudaSlice<bf16>,
    pub(super) qkv_bias: Option<CudaSlice<bf16>>,
    pub(super) o: CudaSlice<bf16>,
    pub(super) mlp_norm: CudaSlice<bf16>,
    pub(super) gate_up: CudaSlice<bf16>,
    pub(super) down: CudaSlice<bf16>,
}

/// Device 0, opened: its context, our stream and cuBLAS handle with its own workspace.
struct Device {
    ctx: Arc<CudaContext>,
    arch: &'static str,
    major: i32,
    sms: u32,
    name: String,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    blas_workspace: CudaSlice<u8>,
}

/// The model's weights on the device.
struct GpuWeights {
    embed: CudaSlice<bf16>,
    lm_head: Option<CudaSlice<bf16>>,
    final_norm: CudaSlice<bf16>,
    layers: Vec<GpuLayer>,
}

impl CudaBackend {
    /// A backend for `spec` with the given weights and cache on device 0, with the settings of
    /// the environment ([`CudaConfig::from_env`]).
    ///
    /// # Errors
    /// As [`CudaBackend::load`], or a setting with a value outside its choices.
    pub fn new(spec: ModelSpec, weights: WeightSource<'_>, shape: CacheShape) -> Result<Self> {
        Self::with_config(spec, weights, shape, CudaConfig::from_env()?)
    }

    /// A backend for `spec` with the given weights, cache and settings on device 0.
    ///
    /// # Errors
    /// No usable device (the message says what is missing), a model the kernels do not take,
    /// a setting out of range, or a device failure (out of memory, kernel compilation).
    pub fn with_config(
        spec: ModelSpec,
        weights: WeightSource<'_>,
        shape: CacheShape,
        cfg: CudaConfig,
    ) -> Result<Self> {
        probe().map_err(err)?;
        let c = &spec.config;
        if c.num_heads / c.num_kv_heads > 8 || c.head_dim > 256 {
            return Err(err(CudaError::Unsupported(format!(
                "{} query heads per KV head and head_dim {}: the attention kernel takes at most 8 and 256",
                c.num_heads / c.num_kv_heads,
                c.head_dim
            ))));
        }
        let dev = Device::open()?;
        let tuned = if cfg.tuned_gemm {
            Some(RefCell::new(TunedGemm::new()?))
        } else {
            None
        };
        let k = Kernels::load(&dev.ctx, dev.arch, dev.major)?;
        let w = GpuWeights::upload(&dev.stream, &k, &spec, weights)?;
        let inv: Vec<f32> = spec.rope_inv_freq().iter().map(|&f| f as f32).collect();
        let inv_freq = dev.stream.clone_htod(&inv).map_err(err)?;
        let kv = c.kv_width() as usize;
        let per_layer = shape.num_blocks as usize * shape.block_size as usize * kv;
        let host = shape.num_host_blocks as usize * shape.block_size as usize * kv;
        let mut k_cache = Vec::new();
        let mut v_cache = Vec::new();
        for _ in 0..c.num_layers {
            k_cache.push(dev.stream.alloc_zeros::<bf16>(per_layer).map_err(err)?);
            v_cache.push(dev.stream.alloc_zeros::<bf16>(per_layer).map_err(err)?);
        }
        dev.stream.synchronize().map_err(err)?;
        tracing::info!(device = %dev.name, arch = dev.arch, blocks = shape.num_blocks, "cuda backend ready");
        let layers = c.num_layers as usize;
        let mut b = CudaBackend {
            k_host: vec![vec![bf16::ZERO; host]; layers],
            v_host: vec![vec![bf16::ZERO; host]; layers],
            spec,
            shape,
            device_name: dev.name,
            stream: dev.stream,
            blas: dev.blas,
            tuned,
            blas_workspace: dev.blas_workspace,
            k,
            embed: w.embed,
            lm_head: w.lm_head,
            final_norm: w.final_norm,
            layers: w.layers,
            inv_freq,
            k_cache,
            v_cache,
            marks: RefCell::new(None),
            kernel_set: cfg.kernels,
            decode_stages: 1,
            sms: dev.sms,
            split_aim: SplitAim::PerSm(DEFAULT_SPLIT_BLOCKS_PER_SM),
            decode_resident: 1,
            cc_major: dev.major,
            graph_mode: cfg.graphs,
            device_sampler: cfg.device_sampler,
            graphs: None,
            graph_stats: GraphStats::default(),
        };
        // Through the setters, which check the values and size what depends on them.
        b.set_split_aim(cfg.split_aim)?;
        b.set_decode_stages(cfg.decode_stages)?;
        Ok(b)
    }
}

impl Device {
    /// Opens device 0: a context without per-argument event tracking, a stream-ordered pool
    /// that keeps freed memory, a stream of our own, cuBLAS on it with its own workspace.
    fn open() -> Result<Self> {
        let ctx = CudaContext::new(0).map_err(err)?;
        // One stream does all the work, so cudarc's per-argument event tracking (for safety
        // across streams) is pure overhead: it recorded events on every kernel argument, which
        // made small decode kernels launch-bound (measured: 15–40 µs per launch).
        // SAFETY: every buffer of this backend is used on `stream` only.
        unsafe { ctx.disable_event_tracking() };
        let (major, minor) = ctx.compute_capability().map_err(err)?;
        let sms = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(err)?
            .max(1) as u32;
        let arch: &'static str = Box::leak(format!("sm_{major}{minor}").into_boxed_str());
        let name = ctx.name().map_err(err)?;
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
        Ok(Device {
            ctx,
            arch,
            major,
            sms,
            name,
            stream,
            blas,
            blas_workspace,
        })
    }
}

impl GpuWeights {
    /// Puts `weights` for `spec` on the device: loaded ones rounded to bf16, or uniform random
    /// ones made by `fill_uniform`.
    fn upload(
        stream: &Arc<CudaStream>,
        k: &Kernels,
        spec: &ModelSpec,
        weights: WeightSource<'_>,
    ) -> Result<Self> {
        let up = |x: &[f32]| -> Result<CudaSlice<bf16>> {
            let b: Vec<bf16> = x.iter().map(|&f| bf16::from_f32(f)).collect();
            stream.clone_htod(&b).map_err(err)
        };
        match weights {
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
                Ok(GpuWeights {
                    embed: up(&w.embed)?,
                    lm_head: w.lm_head.as_deref().map(up).transpose()?,
                    final_norm: up(&w.final_norm)?,
                    layers,
                })
            }
            WeightSource::Random { seed } => Self::random(stream, k, spec, seed),
        }
    }

    /// Uniform random weights of `spec`'s shape, made on the device from `seed`.
    fn random(stream: &Arc<CudaStream>, k: &Kernels, spec: &ModelSpec, seed: u64) -> Result<Self> {
        let c = &spec.config;
        let (h, v, i) = (
            c.hidden_size as usize,
            c.vocab_size as usize,
            c.intermediate_size as usize,
        );
        let (q, kv) = (c.q_width() as usize, c.kv_width() as usize);
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
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(rand(v * h, wscale, seed)?)
        };
        // The order of the fills is the seed's: the embedding is drawn after the layers.
        let embed = rand(v * h, 1.0, seed)?;
        let final_norm = rand(h, 1.0, seed)?;
        Ok(GpuWeights {
            embed,
            lm_head,
            final_norm,
            layers,
        })
    }
}
