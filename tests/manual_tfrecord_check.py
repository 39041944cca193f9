"""Manual check of the tfrecord -> array_record conversion; needs TensorFlow (the `tf` extra), so CI does not run it.

  pip install -e ".[tf]" && python tests/manual_tfrecord_check.py

Writes a 12-example tfrecord-format tfds dataset with TensorFlow, then opens it through perflow_jax (which adds
array_record shards) and reads it back.
"""
import os
import tempfile

import tensorflow_datasets as tfds

from perflow_jax.data import writer, sources, procedural

data_dir = tempfile.mkdtemp()
out = writer.dataset_dir(data_dir, "tfrec_photos", writer.DEFAULT_VERSION)
os.makedirs(out)
identity = tfds.core.dataset_info.DatasetIdentity(name="tfrec_photos", version=tfds.core.Version(writer.DEFAULT_VERSION),
                                                  data_dir=out, module_name="perflow_jax.data")
info = tfds.core.DatasetInfo(builder=identity, features=writer.image_features())
w = tfds.core.SequentialWriter(info, max_examples_per_shard=10, file_format="tfrecord")
w.initialize_splits(["train"])
exs = [dict(image=procedural.example(0, i, 32)["image"], text=procedural.example(0, i, 32)["text"]) for i in range(12)]
w.add_examples({"train": exs}); w.close_all()
formats = lambda: {f.value for f in tfds.builder("tfrec_photos", data_dir=data_dir).info.available_file_formats()}
assert formats() == {"tfrecord"}, formats()
src = sources.open_tfds_source("tfrec_photos", data_dir)
assert formats() == {"tfrecord", "array_record"}, formats()
assert len(src) == 12 and {src[i]["text"].decode() for i in range(12)} == {e["text"] for e in exs}
print("ok: 12 tfrecord examples read back through array_record")
