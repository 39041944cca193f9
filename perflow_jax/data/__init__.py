"""Training data: tensorflow-datasets storage, grain input pipeline, tokenizers, latent cache, procedural set.

Modules:
  pipeline    ``default_data_config()``, ``make_train_iterator(config.data, mesh, tokenizer, seed)``: global
              batches (dicts of jax.Array sharded over ('data', 'fsdp')) with a saveable iterator state
  sources     random-access sources: prepared/catalog tfds datasets, latent caches, the procedural set
  transforms  per-example decode / resize / crop / flip / scale / tokenize
  tokenizer   ``load_tokenizer(path)``, ``write_tiny_clip_tokenizer(path)``, ``tokenize(tok, texts)``
  procedural  the shapes text-image dataset (vocabulary, labels, drawing)
  folder      folders of captioned images -> tfds, with a report of skipped files
  writer      tfds (array_record) writing without TensorFlow
  cache       latent cache: ``build_latent_cache``, ``encode_fn_from_bundle``

Batch structure (the train step sees exactly one of these per run):
  images:  {'images': float32 [B, R, R, 3] in [-1, 1] (NHWC), 'input_ids': int32 [B, 77]}
  cache:   {'latent_mean': float32 [B, h, w, c], 'latent_logvar': float32 [B, h, w, c],
            'context': float32 [B, 77, D]}
"""
