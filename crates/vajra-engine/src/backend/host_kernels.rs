//! The CUDA kernels run on the host (`kernels/host/`: a block's threads as fibers switched at
//! barriers, and attention.cu's mma.sync, ldmatrix.trans and cp.async emulated), so that their
//! algorithms are tested on every machine, not only when a GPU is lent:
//! - `sample.cu`'s `sample_rows` and `argmax_rows` against the Rust reference on
//!   [`gumbel::check_rows`];
//! - `layers.cu`'s fused `rope_kv_write` (v2) against `rope` then `kv_write` (v1), with a
//!   padding row's negative slot;
//! - `attention.cu`'s kernels (`paged_decode_*`, `paged_decode2_*`, `flash_prefill_*`, and v1's
//!   `paged_attention_scalar` + `attention_combine`) against f32 attention over the same paged
//!   cache: split-K at 1 to 64 partitions, a CUDA-graph padding row, a short chunk, sliding
//!   windows.
//!
//! Each skips, with a printed reason, where there is no C++ compiler (`$CXX`, else `c++`).

use crate::sampler::gumbel::{self, DeviceDraw};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The kernels folder of the repository.
fn kernels() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../kernels")
}

/// Builds `kernels/host/<name>.cpp` into a fresh temporary folder of its own; `None` (with the
/// reason printed) when there is no C++ compiler.
fn build(name: &str) -> Option<PathBuf> {
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    if Command::new(&cxx).arg("--version").output().is_err() {
        assert!(
            std::env::var_os("VAJRA_REQUIRE_ALL").is_none(),
            "VAJRA_REQUIRE_ALL is set and the host kernels ({name}) cannot be built: no C++ compiler ({cxx}; set CXX)"
        );
        eprintln!("SKIPPED host kernels ({name}): no C++ compiler ({cxx}; set CXX)");
        return None;
    }
    let dir = std::env::temp_dir().join(format!("vajra-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temporary folder");
    let exe = dir.join(name);
    let out = Command::new(&cxx)
        .args(["-std=c++20", "-O2", "-fno-strict-aliasing", "-o"])
        .arg(&exe)
        .arg(kernels().join(format!("host/{name}.cpp")))
        .output()
        .expect("running the C++ compiler");
    assert!(
        out.status.success(),
        "{cxx} failed on kernels/host/{name}.cpp:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(exe)
}

/// Runs `sample_rows` and `argmax_rows` on the host over `data` (rows of `vocab` logits), with
/// blocks of `threads`; returns the two kernels' tokens.
fn run(
    exe: &Path,
    data: &[f32],
    vocab: usize,
    draws: &[DeviceDraw],
    threads: u32,
) -> [Vec<u32>; 2] {
    let rows = draws.len();
    let mut bytes = Vec::with_capacity(8 + 4 * (data.len() + 8 * rows));
    bytes.extend((rows as u32).to_le_bytes());
    bytes.extend((vocab as u32).to_le_bytes());
    bytes.extend(data.iter().flat_map(|x| x.to_le_bytes()));
    bytes.extend(
        draws
            .iter()
            .flat_map(DeviceDraw::words)
            .flat_map(u32::to_le_bytes),
    );
    let dir = exe.parent().expect("the build folder");
    let (input, output) = (
        dir.join(format!("in-{threads}")),
        dir.join(format!("out-{threads}")),
    );
    std::fs::write(&input, bytes).expect("writing the rows");
    let status = Command::new(exe)
        .arg(&input)
        .arg(&output)
        .arg(threads.to_string())
        .status()
        .expect("running sample_check");
    assert!(status.success(), "sample_check exited with {status}");
    let words: Vec<u32> = std::fs::read(&output)
        .expect("reading the tokens")
        .chunks_exact(4)
        .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
        .collect();
    assert_eq!(
        words.len(),
        2 * rows,
        "sample_check wrote {} ids",
        words.len()
    );
    [words[..rows].to_vec(), words[rows..].to_vec()]
}

#[test]
fn sample_rows_on_the_host_matches_the_reference_draws() {
    let Some(exe) = build("sample_check") else {
        return;
    };
    // Every row with a 2-warp block (fast under OS threads), then a sample of rows with the
    // block the CUDA backend launches (SAMPLE_THREADS = 512: every warp of the reductions in
    // play, one per digit of floor_digit's tallies).
    let vocab = 4096;
    let (data, draws) = gumbel::check_rows(vocab);
    let [sampled, greedy] = run(&exe, &data, vocab, &draws, 64);
    let differ = gumbel::check_tokens(&data, vocab, &draws, &sampled)
        .unwrap_or_else(|e| panic!("sample_rows (64 threads) against the reference: {e}"));
    for (r, &g) in greedy.iter().enumerate() {
        assert_eq!(
            g,
            crate::sampler::argmax(&data[r * vocab..(r + 1) * vocab]),
            "argmax_rows, row {r}"
        );
    }
    let picked: Vec<usize> = (0..draws.len()).step_by(37).collect();
    let sub_data: Vec<f32> = picked
        .iter()
        .flat_map(|&r| data[r * vocab..(r + 1) * vocab].iter().copied())
        .collect();
    let sub_draws: Vec<DeviceDraw> = picked.iter().map(|&r| draws[r]).collect();
    let [wide, _] = run(&exe, &sub_data, vocab, &sub_draws, 512);
    gumbel::check_tokens(&sub_data, vocab, &sub_draws, &wide)
        .unwrap_or_else(|e| panic!("sample_rows (512 threads) against the reference: {e}"));
    let _ = std::fs::remove_dir_all(exe.parent().expect("the build folder"));
    eprintln!(
        "MEASURED sample_rows on the host: {differ} of {} rows differ from the reference",
        draws.len()
    );
}

/// Builds and runs a self-checking program of `kernels/host/` (it exits 1 on a mismatch), and
/// requires `cases` lines of "checked" output.
fn run_check(name: &str, cases: usize) {
    let Some(exe) = build(name) else {
        return;
    };
    let out = Command::new(&exe).output().expect("running the check");
    let _ = std::fs::remove_dir_all(exe.parent().expect("the build folder"));
    assert!(
        out.status.success(),
        "{name} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let checked = String::from_utf8_lossy(&out.stdout);
    assert_eq!(checked.lines().count(), cases, "{name} checked: {checked}");
    eprint!("{checked}");
}

#[test]
fn rope_kv_write_on_the_host_equals_rope_then_kv_write() {
    run_check("layers_check", 4);
}

#[test]
fn v2_attention_kernels_on_the_host_match_f32_attention() {
    run_check("attention_check", 10);
}
