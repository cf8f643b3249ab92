//! Named model shapes for benchmarks and profiles that need a model's shape but not its weights
//! (random weights are made on the device): the built-in models of `vajra-experiment`'s
//! catalog, whose `config.json` text the simulator reads too.

use vajra_experiment::catalog;

/// The spec of a named shape.
///
/// # Errors
/// An unknown name (the message lists the known ones).
pub fn named(name: &str) -> crate::Result<crate::spec::ModelSpec> {
    let (full, json) = catalog::model_json(name)
        .ok_or_else(|| crate::EngineError::invalid("shape", name, catalog::model_names()))?;
    let short = full.rsplit('/').next().unwrap_or(full);
    crate::spec::ModelSpec::from_json(json, short)
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_named_shape_parses_and_has_its_parameter_count() {
        let l3 = super::named("meta-llama-3-8b").unwrap();
        assert_eq!(l3.config.num_params() / 1_000_000, 8030);
        let smol = super::named("SmolLM2-135M").unwrap();
        assert!(smol.config.tie_word_embeddings);
        // Every Llama-architecture entry of the catalog builds an engine model.
        for (n, json) in super::catalog::MODELS {
            if json.contains(r#""model_type":"llama""#) {
                super::named(n).unwrap();
            }
        }
        assert!(
            super::named("gpt-5")
                .unwrap_err()
                .to_string()
                .contains("Llama-2-7b-hf")
        );
    }
}
