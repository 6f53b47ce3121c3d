"""Research tooling of the embedded model: what the shipped world model was made and is judged with.

- world/:     the synthetic world (scenes, captions, renderer) and its held-out concepts and styles
- basemodel/: the embedded SD-architecture model's configs, its training script and its weights
              (the service's default model: service.engine.default_model loads them)
- measures/:  the attribute classifier and metrics the quality benchmarks read images with

The serving path needs only basemodel/weights; everything else here serves training, evaluation and
the benchmarks (docs/world.md, docs/evaluation.md).
"""
