"""Every Cloud Storage client the project uses works against the local emulator and contacts nothing else.

One fake-gcs-server (tests/gcs_testutil.py) serves the whole class. Each test uses its own prefix in the bucket and
ends by checking that the network guard recorded no contact with a non-local address; negative controls show that
the audit hook (in a child and in this process) and the metadata recorder do record one.
"""
import contextlib
import json
import logging
import os
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
from typing import Iterator

from absl.testing import absltest
import numpy as np

import gcs_testutil

_CHILD_TIMEOUT_S = 120


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
  """Silences a logger: gcsfs logs a traceback each time the emulator refuses its moveTo call (see test_epath)."""
  logger = logging.getLogger(logger_name)
  level = logger.level
  logger.setLevel(logging.CRITICAL + 1)
  try:
    yield
  finally:
    logger.setLevel(level)


def _read_event_records(data: bytes) -> list[bytes]:
  """Splits a TFRecord file (tensorboard events) into its records, checking both CRCs of each."""
  from tensorboardX.record_writer import masked_crc32c  # pylint: disable=g-import-not-at-top
  records, offset = [], 0
  while offset < len(data):
    header = data[offset:offset + 8]
    (length,) = struct.unpack("Q", header)
    (header_crc,) = struct.unpack("I", data[offset + 8:offset + 12])
    assert header_crc == masked_crc32c(header), f"bad header CRC at byte {offset}"
    record = data[offset + 12:offset + 12 + length]
    (record_crc,) = struct.unpack("I", data[offset + 12 + length:offset + 16 + length])
    assert record_crc == masked_crc32c(record), f"bad record CRC at byte {offset}"
    records.append(record)
    offset += 16 + length
  return records


def _scalars(data: bytes) -> dict[int, float]:
  """{step: value} of the scalar summaries in an event file."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  out = {}
  for record in _read_event_records(data):
    event = event_pb2.Event.FromString(record)
    for value in event.summary.value:
      out[event.step] = value.simple_value
  return out


class GcsEmulatorTest(absltest.TestCase):
  """epath, gcsfs, google-cloud-storage, orbax/tensorstore and tensorboardX on gs://, against one emulator."""

  gcs: gcs_testutil.GcsEmulator

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.gcs = gcs_testutil.GcsEmulator.for_test_class(cls)

  def setUp(self):
    super().setUp()
    self.gcs.clear_foreign_contacts()

  def assert_hermetic(self) -> None:
    self.assertEqual(self.gcs.foreign_contacts(), [])

  def _child(self, code: str) -> subprocess.CompletedProcess[str]:
    """Runs `python -c code` with the fixture's environment; fails the test if it fails."""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env={**os.environ, **self.gcs.env()},
                            capture_output=True, text=True, timeout=_CHILD_TIMEOUT_S, check=False)
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    return result

  # -- etils.epath (orbax's directory work, perflow_jax.storage) ---------------------------------------------------
  def test_epath(self):
    from etils import epath  # pylint: disable=g-import-not-at-top
    from etils.epath import backend  # pylint: disable=g-import-not-at-top
    root = epath.Path("gs://bucket/epath")
    # Without tensorflow (or with EPATH_USE_TF=false) gs:// goes through fsspec, i.e. gcsfs.
    self.assertIs(root._backend, backend.fsspec_backend)  # pylint: disable=protected-access

    (root / "sub").mkdir(parents=True, exist_ok=True)
    (root / "a.txt").write_text("alpha")
    (root / "sub" / "b.txt").write_text("beta")
    self.assertEqual((root / "a.txt").read_text(), "alpha")
    self.assertTrue((root / "sub").exists())
    self.assertTrue((root / "sub").is_dir())
    self.assertFalse((root / "missing").exists())
    self.assertEqual(sorted(p.name for p in root.iterdir()), ["a.txt", "sub"])
    self.assertEqual([p.name for p in root.glob("*.txt")], ["a.txt"])
    # Buckets have no folders: mkdir writes no object, only the files exist.
    self.assertEqual(self.gcs.list_objects("gs://bucket/epath/"), ["epath/a.txt", "epath/sub/b.txt"])

    # Renaming a "directory" moves each object under it (gcsfs tries the objects.moveTo API per object and, where it
    # is refused as by this emulator, copies and deletes). Not atomic: a reader can see a half-moved tree.
    with _quiet("gcsfs"):
      root.rename(epath.Path("gs://bucket/epath_renamed"))
    self.assertFalse(root.exists())
    self.assertEqual(self.gcs.list_objects("gs://bucket/epath_renamed/"),
                     ["epath_renamed/a.txt", "epath_renamed/sub/b.txt"])
    renamed = epath.Path("gs://bucket/epath_renamed")
    (renamed / "a.txt").unlink()
    self.assertFalse((renamed / "a.txt").exists())
    renamed.rmtree()
    self.assertEqual(self.gcs.list_objects("gs://bucket/epath_renamed/"), [])
    self.assert_hermetic()

  # -- fsspec / gcsfs ----------------------------------------------------------------------------------------------
  def test_fsspec(self):
    import fsspec  # pylint: disable=g-import-not-at-top
    import gcsfs  # pylint: disable=g-import-not-at-top
    fs = fsspec.filesystem("gs")
    # Not ExtendedGcsFileSystem: see GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT in gcs_testutil.
    self.assertIs(type(fs), gcsfs.core.GCSFileSystem)
    self.assertEqual(fs.credentials.method, "anon")  # FSSPEC_GCS_TOKEN: no google.auth lookups
    with fsspec.open("gs://bucket/fsspec/f.bin", "wb") as f:
      f.write(b"one")
    with fsspec.open("gs://bucket/fsspec/f.bin", "rb") as f:
      self.assertEqual(f.read(), b"one")
    # Objects are immutable: gcsfs turns "a" into "w" with a warning, so "appending" REPLACES the content.
    with self.assertWarnsRegex(UserWarning, "Append mode 'a' is not supported"):
      with fsspec.open("gs://bucket/fsspec/f.bin", "ab") as f:
        f.write(b"two")
    self.assertEqual(self.gcs.read_bytes("gs://bucket/fsspec/f.bin"), b"two")
    self.assert_hermetic()

  # -- google-cloud-storage and the helpers -------------------------------------------------------------------------
  def test_storage_client_and_helpers(self):
    from google.auth.credentials import AnonymousCredentials  # pylint: disable=g-import-not-at-top
    from google.cloud import storage  # pylint: disable=g-import-not-at-top
    with tempfile.TemporaryDirectory() as local:
      os.makedirs(os.path.join(local, "d"))
      for name, content in (("x.txt", b"x"), ("d/y.bin", b"\x00y")):
        with open(os.path.join(local, name), "wb") as f:
          f.write(content)
      self.assertEqual(self.gcs.upload_dir(local, "gs://bucket/helpers"), ["helpers/d/y.bin", "helpers/x.txt"])
    self.assertEqual(self.gcs.list_objects("gs://bucket/helpers"), ["helpers/d/y.bin", "helpers/x.txt"])
    self.assertEqual(self.gcs.read_bytes("gs://bucket/helpers/d/y.bin"), b"\x00y")
    # A plain Client() (as tensorboardX and orbax build it) finds the emulator through STORAGE_EMULATOR_HOST and
    # goes anonymous instead of calling google.auth.default().
    client = storage.Client()
    self.assertIsInstance(client._credentials, AnonymousCredentials)  # pylint: disable=protected-access
    self.assertEqual(sorted(b.name for b in client.list_blobs("bucket", prefix="helpers/")),
                     ["helpers/d/y.bin", "helpers/x.txt"])
    self.assertEqual(self.gcs.delete_prefix("gs://bucket/helpers/"), 2)
    self.assert_hermetic()

  # -- orbax (epath for directories, tensorstore for arrays) --------------------------------------------------------
  def test_orbax_checkpoint_manager(self):
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    from etils import epath  # pylint: disable=g-import-not-at-top
    from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
    mesh = jax.make_mesh((len(jax.devices()),), ("d",))
    tree = {"w": jax.device_put(jnp.arange(32.0).reshape(8, 4), NamedSharding(mesh, P("d"))),
            "step": jnp.int32(0), "b": {"v": jnp.linspace(0.0, 1.0, 5)}}
    directory = "gs://bucket/orbax/ckpt"

    writer = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(max_to_keep=5))
    for step in (1, 2, 3):
      writer.save(step, args=ocp.args.StandardSave(jax.tree.map(lambda x, s=step: x + s, tree)))
    writer.wait_until_finished()
    writer.close()
    objects = self.gcs.list_objects(directory)
    # On gs:// orbax writes each step in place and marks it complete with commit_success.txt (no atomic rename).
    self.assertIn("orbax/ckpt/2/commit_success.txt", objects)
    self.assertTrue(any(name.startswith("orbax/ckpt/2/default/ocdbt.process_0/") for name in objects), objects)

    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
    reader = ocp.CheckpointManager(directory)
    self.assertEqual(reader.all_steps(), [1, 2, 3])
    restored = reader.restore(2, args=ocp.args.StandardRestore(abstract))
    jax.tree.map(lambda got, want: np.testing.assert_array_equal(np.asarray(got), np.asarray(want) + 2),
                 restored, tree)
    self.assertEqual(restored["w"].sharding, tree["w"].sharding)

    # Deleting a step removes its objects (orbax's gcs_utils.rmtree, which also asks google-cloud-storage whether
    # the bucket has a hierarchical namespace).
    reader.delete(3)
    self.assertEqual(reader.all_steps(), [1, 2])
    self.assertEqual(self.gcs.list_objects(f"{directory}/3/"), [])

    # A step without its commit marker is invisible; a step directory moved away is gone after reload().
    (epath.Path(directory) / "2" / "commit_success.txt").unlink()
    reader.reload()
    self.assertEqual(reader.all_steps(), [1])
    with _quiet("gcsfs"):
      (epath.Path(directory) / "1").rename(epath.Path("gs://bucket/orbax/aside_1"))
    self.assertEqual(reader.all_steps(), [1])  # cached until reload()
    reader.reload()
    self.assertEqual(reader.all_steps(), [])
    reader.close()
    self.assertIn("orbax/aside_1/commit_success.txt", self.gcs.list_objects("gs://bucket/orbax/aside_1/"))
    self.assert_hermetic()

  # -- tensorboardX ---------------------------------------------------------------------------------------------------
  def test_tensorboardx(self):
    # In a child, as in training: tensorboardX's GCS writer uploads its whole buffer once more from __del__, which in
    # the test process would run at interpreter exit, after the emulator is gone, and retry for 120 s. The child
    # counts uploads by wrapping Blob.upload_from_string (instrumentation only: the call goes through unchanged).
    result = self._child("""
        import json
        from google.cloud import storage
        uploads = []
        upload_from_string = storage.Blob.upload_from_string
        def counted(blob, data, *args, **kwargs):
          uploads.append(bytes(data))
          return upload_from_string(blob, data, *args, **kwargs)
        storage.Blob.upload_from_string = counted

        from tensorboardX import SummaryWriter
        writer = SummaryWriter("gs://bucket/tb/run/tensorboard")
        for step in range(3):
          writer.add_scalar("loss", 1.0 / (step + 1), step)
        writer.close()  # the only barrier: flush() does not wait for events still queued for the writer thread
        print(json.dumps({"sizes": [len(u) for u in uploads],
                          "whole_file_each_time": all(uploads[-1].startswith(u) for u in uploads)}))
        """)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    (name,) = self.gcs.list_objects("gs://bucket/tb/run/tensorboard/")
    self.assertIn("events.out.tfevents.", name)
    data = self.gcs.read_bytes(f"gs://bucket/{name}")
    self.assertEqual(_scalars(data), {0: 1.0, 1: 0.5, 2: np.float32(1.0 / 3)})
    # Every flush (and close) re-uploads the event file from byte 0 as a new generation of the same object.
    self.assertGreaterEqual(len(report["sizes"]), 2, report)
    self.assertTrue(report["whole_file_each_time"], report)
    self.assertEqual(report["sizes"][-1], len(data))
    self.assert_hermetic()

  # -- subprocesses and the guard -------------------------------------------------------------------------------------
  def test_child_process_clients_stay_local(self):
    result = self._child("""
        import sys
        import fsspec
        import tensorstore as ts
        from etils import epath
        assert getattr(sys, "_gcs_testutil_guard_installed", False), "sitecustomize did not run"
        epath.Path("gs://bucket/child/epath.txt").write_text("epath")
        with fsspec.open("gs://bucket/child/gcsfs.bin", "wb") as f:
          f.write(b"gcsfs")
        kv = ts.KvStore.open({"driver": "gcs", "bucket": "bucket", "path": "child/ts/"}).result()
        kv.write("key", b"tensorstore").result()
        print(kv.read("key").result().value.decode())
        """)
    self.assertEqual(result.stdout.strip(), "tensorstore")
    self.assertEqual(self.gcs.list_objects("gs://bucket/child/"),
                     ["child/epath.txt", "child/gcsfs.bin", "child/ts/key"])
    self.assertEqual(self.gcs.read_bytes("gs://bucket/child/ts/key"), b"tensorstore")
    self.assert_hermetic()

  def test_persistent_compilation_cache_in_the_bucket(self):
    # The trainer's config.compilation_cache_dir on gs://: the first process writes the compiled program into the
    # bucket, the second (a restart) loads it instead of compiling.
    code = """
        import jax, jax.numpy as jnp
        from perflow_jax import compile_cache
        compile_cache.enable("gs://bucket/jit_cache", "/not/used")
        x = jnp.arange(3.0)
        before = compile_cache.cache_hits()
        jax.jit(lambda x: jnp.cos(x) * 2.0 - 0.5).lower(x).compile()
        print(compile_cache.cache_hits() - before)
        """
    self.assertEqual(self._child(code).stdout.strip(), "0")
    written = self.gcs.list_objects("gs://bucket/jit_cache/")
    self.assertNotEmpty([name for name in written if name.endswith("-cache")], written)
    second = self._child(code)
    self.assertEqual(second.stdout.strip(), "1", second.stderr[-3000:])
    self.assert_hermetic()

  def test_guard_records_a_foreign_lookup_in_a_child(self):
    # The audit hook logs before the lookup runs, so this needs no network; the lookup runs in a daemon thread that
    # is abandoned after a short wait, so an unreachable DNS server can't stall the test.
    self._child("""
        import socket, threading
        def lookup():
          try:
            socket.getaddrinfo("example.com", 80)
          except OSError:
            pass
        thread = threading.Thread(target=lookup, daemon=True)
        thread.start()
        thread.join(timeout=2)
        """)
    contacts = self.gcs.foreign_contacts()
    self.assertLen(contacts, 1, contacts)
    self.assertIn("socket.getaddrinfo host='example.com' port=80", contacts[0])

  def test_guard_classifies_addresses_in_process(self):
    # sys.audit raises the same events a real connection would, without any traffic.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as inet, \
         socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unix:
      for event, args in (("socket.connect", (inet, ("127.0.0.1", 80))),
                          ("socket.connect", (unix, "/tmp/some.sock")),
                          ("socket.getaddrinfo", ("localhost", 443, 0, 0, 0)),
                          ("socket.getaddrinfo", (None, 0, 0, 0, 0)),
                          ("socket.getaddrinfo", ("::1", 443, 0, 0, 0))):
        sys.audit(event, *args)
      self.assert_hermetic()
      sys.audit("socket.connect", inet, ("203.0.113.7", 443))
      sys.audit("socket.getaddrinfo", "metadata.google.internal", 80, 0, 0, 0)
    contacts = self.gcs.foreign_contacts()
    self.assertLen(contacts, 2, contacts)
    self.assertIn("socket.connect host='203.0.113.7' port=443", contacts[0])
    self.assertIn("host='metadata.google.internal'", contacts[1])

  def test_metadata_recorder_catches_credential_lookups(self):
    # Without the fixed token, tensorstore (C++, invisible to the audit hook) looks for GCE credentials: the lookup
    # lands on the recorder. google.auth.default() likewise pings the recorder instead of 169.254.169.254.
    env = {**os.environ, **self.gcs.env()}
    del env["GOOGLE_AUTH_TOKEN_FOR_TESTING"]
    code = textwrap.dedent("""
        import tensorstore as ts
        kv = ts.KvStore.open({"driver": "gcs", "bucket": "bucket", "path": "recorder/"}).result()
        kv.write("key", b"v").result()
        import google.auth, google.auth.exceptions
        try:
          google.auth.default()
        except google.auth.exceptions.DefaultCredentialsError:
          pass
        """)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            timeout=_CHILD_TIMEOUT_S, check=False)
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    contacts = self.gcs.foreign_contacts()
    self.assertTrue(any("/computeMetadata/v1/instance/service-accounts/" in c for c in contacts), contacts)
    self.assertTrue(any(c.startswith("metadata recorder: GET / ") for c in contacts), contacts)
    self.assertTrue(all(c.startswith("metadata recorder:") for c in contacts), contacts)


if __name__ == "__main__":
  absltest.main()
