//! The engine's step log (`serve --steps-log`) against its own counters.

use super::*;

/// A writer the test can read back while the engine owns it.
#[derive(Clone, Default)]
struct Shared(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Shared {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn the_step_log_has_a_line_per_step_that_adds_up_to_the_counters() {
    use vajra_core::config::{PolicyConfig, SchedulerConfig};
    use vajra_core::sched::config::SarathiConfig;
    let dir = fixture("tiny-llama");
    let cfg = EngineConfig {
        scheduler: SchedulerConfig::new(PolicyConfig::Sarathi(SarathiConfig {
            chunk_size: 8, // prompts take several chunks; only the last samples
            ..SarathiConfig::default()
        })),
        cache: CacheConfig {
            block_size: 4,
            ..CacheConfig::default()
        },
        ..EngineConfig::default()
    };
    let mut engine = vajra_engine::load_cpu_engine(&dir, cfg, 4).unwrap();
    let log = Shared::default();
    engine.log_steps(Box::new(log.clone())).unwrap();
    let prompts: [usize; 3] = [13, 21, 5];
    for (i, len) in prompts.into_iter().enumerate() {
        let mut sampling = SamplingParams::greedy(6 + i as u32);
        sampling.ignore_eos = true;
        engine
            .add_request(GenerateRequest {
                prompt: (0..len as u32).map(|t| 1 + t % 50).collect(),
                sampling,
                priority: 0,
            })
            .unwrap();
    }
    let outs = engine.run_to_completion().unwrap();
    let text = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some(vajra_engine::engine::STEP_LOG_HEADER));
    let (mut steps, mut tokens, mut sampled, mut chunks) = (0u64, 0u64, 0usize, 0usize);
    let mut last_start = 0.0;
    for line in lines {
        let f: Vec<&str> = line.split(',').collect();
        assert_eq!(f.len(), 8, "{line}");
        assert_eq!(f[0].parse::<u64>().unwrap(), steps, "steps numbered from 0");
        let start: f64 = f[1].parse().unwrap();
        let (step_ms, fwd_ms): (f64, f64) = (f[2].parse().unwrap(), f[3].parse().unwrap());
        assert!(
            start >= last_start && fwd_ms > 0.0 && fwd_ms <= step_ms,
            "{line}"
        );
        last_start = start;
        let items: Vec<&str> = f[7].split(' ').collect();
        assert_eq!(items.len(), f[4].parse::<usize>().unwrap(), "{line}");
        let mut t = 0u64;
        let mut s = 0usize;
        for it in &items {
            let (c, k) = it.trim_end_matches('*').split_once('@').unwrap();
            t += c.parse::<u64>().unwrap();
            k.parse::<u32>().unwrap();
            s += usize::from(it.ends_with('*'));
            chunks += usize::from(!it.ends_with('*'));
        }
        assert_eq!(t, f[5].parse::<u64>().unwrap(), "{line}");
        assert_eq!(s, f[6].parse::<usize>().unwrap(), "{line}");
        steps += 1;
        tokens += t;
        sampled += s;
    }
    let c = engine.counters();
    assert_eq!((steps, tokens), (c.steps, c.batched_tokens));
    let generated: usize = outs.iter().map(|o| o.tokens.len()).sum();
    assert_eq!(sampled, generated, "one sampled row per generated token");
    assert!(
        chunks >= 3,
        "the 13- and 21-token prompts ran in non-sampling chunks"
    );
}
