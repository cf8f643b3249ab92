//! Tests that need no GPU: kernel compilation, step plans, split-K sizing, settings.

use super::attention::{split_count, split_count_waves};
use super::graphs::{GRAPH_BATCHES, GRAPH_MAX_BATCH};
use super::kernels::kernel_names;
use super::*;

/// Runs where libnvrtc.so.13 can be loaded (CI downloads the `nvidia-cuda-nvrtc` wheel);
/// needs no GPU.
#[test]
fn nvrtc_compiles_every_kernel_for_sm90() {
    // SAFETY: only dlopen.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        eprintln!(
            "SKIPPED nvrtc_compiles_every_kernel_for_sm90: libnvrtc.so.13 is not on the library \
             path (pip download nvidia-cuda-nvrtc; .ci/run does)"
        );
        return;
    }
    let ptx = compile_kernels("sm_90").unwrap();
    assert_eq!(ptx.len(), KERNEL_SOURCES.len());
    // scripts/gpu-check.sh assembles these with ptxas for the register/spill report.
    if let Some(dir) = std::env::var_os("VAJRA_PTX_DIR") {
        std::fs::create_dir_all(&dir).unwrap();
        for (name, p) in &ptx {
            let file = Path::new(&dir).join(name.replace(".cu", ".ptx"));
            std::fs::write(file, p.to_src()).unwrap();
        }
    }
    for (name, p) in &ptx {
        let text = p.to_src();
        assert!(
            text.contains(".target sm_90"),
            "{name}: not compiled for sm_90"
        );
        for k in kernel_names(name) {
            assert!(
                text.contains(&format!(".entry {k}(")),
                "{name}: kernel {k} missing from the PTX"
            );
        }
    }
}

fn seq<'a>(tokens: &'a [u32], context: u32, table: &'a [BlockId]) -> super::super::SeqInput<'a> {
    super::super::SeqInput {
        tokens,
        context,
        block_table: table,
        sample: true,
    }
}

/// Every part of a plan, by name, as a slice of its packed arrays.
fn parts(p: &StepPlan) -> Vec<Vec<i32>> {
    [
        Part::Ids,
        Part::Pos,
        Part::Seq,
        Part::Slots,
        Part::List,
        Part::Rows,
        Part::Tables,
    ]
    .into_iter()
    .map(|part| p.ints[p.part(part)].to_vec())
    .collect()
}

#[test]
fn a_step_plan_packs_every_index_array_once_in_order() {
    // A 70-token prefill chunk (chunk-wide attention) over 10 cached tokens, then a decode
    // at position 20 of a two-block table.
    let long: Vec<u32> = (0..70).collect();
    let (ta, tb) = (
        [
            BlockId(7),
            BlockId(3),
            BlockId(9),
            BlockId(4),
            BlockId(5),
            BlockId(6),
        ],
        [BlockId(2), BlockId(8)],
    );
    let input = StepInput {
        seqs: vec![seq(&long, 10, &ta), seq(&[42], 20, &tb)],
        logits_for: LogitsFor::Sampled,
    };
    let p = StepPlan::new(&input, 16, None);
    assert_eq!(
        (p.t, p.listed, p.rows, p.seqs, p.max_blocks),
        (71, 1, 2, 2, 6)
    );
    assert_eq!(p.max_ctx, 21, "only listed tokens' contexts count");
    assert_eq!(p.chunks.len(), 1);
    assert_eq!(
        (p.chunks[0].first, p.chunks[0].len, p.chunks[0].context),
        (0, 70, 10)
    );
    let v = parts(&p);
    assert_eq!(v[0][..3], [0, 1, 2]);
    assert_eq!(v[0][70], 42);
    assert_eq!(v[1][0], 10);
    assert_eq!(v[1][70], 20);
    assert_eq!(v[2][69..], [0, 1]);
    // Position 10 is block 0 (id 7) offset 10; position 20 of b is block 1 (id 8) offset 4.
    assert_eq!(v[3][0], 7 * 16 + 10);
    assert_eq!(v[3][70], 8 * 16 + 4);
    assert_eq!(v[4], [70]);
    assert_eq!(v[5], [69, 70]);
    assert_eq!(v[6], [7, 3, 9, 4, 5, 6, 2, 8, 0, 0, 0, 0]);
    assert_eq!(p.ints.len(), 4 * 71 + 1 + 2 + 12);
    assert!(p.ints.len() <= StepPlan::ints_len(p.t, p.max_blocks));
}

#[test]
fn a_padded_decode_plan_has_the_graphs_shape_and_inert_padding_rows() {
    let (ta, tb, tc) = ([BlockId(1)], [BlockId(2), BlockId(5)], [BlockId(3)]);
    let input = StepInput {
        seqs: vec![seq(&[11], 4, &ta), seq(&[12], 17, &tb), seq(&[13], 0, &tc)],
        logits_for: LogitsFor::Sampled,
    };
    let p = StepPlan::new(&input, 16, Some((4, 8)));
    assert_eq!(
        (p.t, p.listed, p.rows, p.seqs, p.max_blocks),
        (4, 4, 4, 4, 8)
    );
    assert_eq!(p.max_ctx, 18);
    assert!(p.chunks.is_empty());
    let v = parts(&p);
    assert_eq!(v[0], [11, 12, 13, 0]);
    assert_eq!(v[1], [4, 17, 0, 0]);
    // The padding row reads its own (empty) table row and writes no slot.
    assert_eq!(v[2], [0, 1, 2, 3]);
    assert_eq!(v[3], [16 + 4, 5 * 16 + 1, 3 * 16, -1]);
    assert_eq!(v[4], [0, 1, 2, 3]);
    assert_eq!(v[5], [0, 1, 2, 3]);
    assert_eq!(&v[6][..8], &[1, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(&v[6][8..10], &[2, 5]);
    assert!(v[6][24..].iter().all(|&b| b == 0));
    // Parts of a padded plan depend only on (batch, width): a graph's fixed addresses.
    assert_eq!(p.ints.len(), StepPlan::ints_len(4, 8));
    assert!(p.ints.len() <= StepPlan::ints_len(GRAPH_MAX_BATCH, 8));
}

#[test]
fn graph_batches_pad_every_decode_batch_to_the_next_capture_size() {
    assert!(GRAPH_BATCHES.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(GRAPH_MAX_BATCH, 128);
    for n in 1..=GRAPH_MAX_BATCH {
        let b = GRAPH_BATCHES.iter().copied().find(|&b| b >= n).unwrap();
        assert!(b - n < 8, "batch {n} padded to {b}");
    }
}

#[test]
fn split_count_fills_the_gpu_without_splits_under_64_keys() {
    // H100: 132 SMs, aiming at 2 blocks each. Llama-3-8B's 8 KV heads at batch 1: 33 splits
    // would make 264 blocks, but a 300-token context has only 5 splits of 64 keys.
    assert_eq!(split_count(8, 264, 300, true), 5);
    assert_eq!(split_count(8, 264, 8192, true), 33);
    assert_eq!(split_count(264, 264, 8192, true), 1);
    // Batch 32: 256 pairs, 2 splits; aiming at 3 blocks per SM, 2 as well; at 6, 4.
    assert_eq!(split_count(256, 264, 512, true), 2);
    assert_eq!(split_count(256, 396, 512, true), 2);
    assert_eq!(split_count(256, 792, 512, true), 4);
    assert_eq!(split_count(1, 132, 100_000, true), MAX_SPLITS);
    assert_eq!(split_count(0, 132, 10, true), 1);
    // v1: 32 keys a split whatever the batch, while the GPU is not full.
    assert_eq!(split_count(8, 264, 300, false), 10);
}

#[test]
fn split_count_waves_fills_whole_waves_of_resident_blocks() {
    // H100 with paged_decode_128 at 3 blocks per SM: 396 slots.
    // Batch 32 (256 pairs): 1 split is 0.65 of a wave, 2 are 1.29 (2 waves for 2 halves);
    // 3 make 1.94 waves of thirds.
    assert_eq!(split_count_waves(256, 396, 512), 3);
    // Batch 8 (64 pairs): 6 splits fill one wave (7 or 8 would need a second).
    assert_eq!(split_count_waves(64, 396, 512), 6);
    // Batch 1 (8 pairs): as many as the context allows (8 of 64 keys at 512).
    assert_eq!(split_count_waves(8, 396, 512), 8);
    // A long context: about one wave (49 would fill it, but saves under 5 % over 48).
    assert_eq!(split_count_waves(8, 396, 100_000), 48);
    // Batch 128 (1024 pairs, 2.59 waves): thirds take 8 waves of a third, 2.67 < 3.
    assert_eq!(split_count_waves(1024, 396, 512), 3);
    // Whole waves already, or too short to split.
    assert_eq!(split_count_waves(792, 396, 4096), 1);
    assert_eq!(split_count_waves(8, 396, 64), 1);
    assert_eq!(split_count_waves(0, 0, 10), 1);
}

#[test]
fn split_aims_parse_and_print_as_the_setting_is_written() {
    assert_eq!("waves".parse::<SplitAim>().unwrap(), SplitAim::Waves);
    assert_eq!("4".parse::<SplitAim>().unwrap(), SplitAim::PerSm(4));
    for bad in ["0", "33", "auto", "-1", ""] {
        let e = bad.parse::<SplitAim>().unwrap_err().to_string();
        assert!(e.contains("waves") && e.contains("1 to 32"), "{bad}: {e}");
    }
    assert_eq!(SplitAim::PerSm(3).to_string(), "3");
    assert_eq!(SplitAim::Waves.to_string(), "waves");
}

#[test]
fn probe_explains_a_missing_device_instead_of_panicking() {
    match probe() {
        Ok(()) => eprintln!("a CUDA device is present"),
        Err(why) => assert!(!why.to_string().is_empty()),
    }
}

#[test]
fn cuda_settings_are_read_in_one_place_and_bad_values_are_named() {
    use std::collections::HashMap;
    let from = |pairs: &[(&str, &str)]| {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        CudaConfig::from_vars(move |k| m.get(k).cloned().ok_or(std::env::VarError::NotPresent))
    };
    assert_eq!(from(&[]).unwrap(), CudaConfig::default());
    let c = from(&[
        ("VAJRA_CUDA_KERNELS", "v1"),
        ("VAJRA_CUDA_GRAPHS", "on"),
        ("VAJRA_CUDA_GEMM", "tuned"),
        ("VAJRA_CUDA_SAMPLER", "device"),
        ("VAJRA_CUDA_SPLIT_BLOCKS_PER_SM", "waves"),
        ("VAJRA_CUDA_DECODE_STAGES", "2"),
    ])
    .unwrap();
    assert_eq!(
        c,
        CudaConfig {
            kernels: KernelSet::V1,
            graphs: true,
            tuned_gemm: true,
            device_sampler: true,
            split_aim: SplitAim::Waves,
            decode_stages: 2,
        }
    );
    for (var, bad, allowed) in [
        ("VAJRA_CUDA_GRAPHS", "yes", "off, on"),
        ("VAJRA_CUDA_DECODE_STAGES", "3", "1, 2"),
        ("VAJRA_CUDA_SPLIT_BLOCKS_PER_SM", "64", "waves"),
    ] {
        let e = from(&[(var, bad)]).unwrap_err().to_string();
        assert!(
            e.contains(var) && e.contains(bad) && e.contains(allowed),
            "{e}"
        );
    }
}
