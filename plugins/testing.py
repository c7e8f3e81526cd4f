"""The author kit's test tools: install a plugin from its source folder, run it in a real host.

A plugin's tests use the `llmos_plugin` fixture (enable it with
`pytest_plugins = ["llmos.plugins.testing"]` in the plugin's conftest.py):

    def test_blocks(llmos_plugin):
        host = llmos_plugin(Path(__file__).parent.parent)      # the plugin's folder
        result = host.call_hook("llmos_before_request", prompt="hi", tenant="t", task_id="1")

The fixture starts the same plugin-host process the kernel starts
(`python -m llmos.plugins.host`), with the same manifest checks and confinement, and talks
to it over gRPC on a Unix socket; it stops it at the end of the test.

`install_source` makes the plugin importable and discoverable without pip and without
touching the environment: it writes the distribution's metadata (`METADATA`,
`entry_points.txt`) into a folder of its own, as `pip install -e` would, and returns the
PYTHONPATH that puts that folder and the plugin's source on the import path. The kernel's
integration tests use it too, for plugins that crash or hang on purpose.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format, struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmos.v1 import plugin_pb2, plugin_pb2_grpc


@dataclasses.dataclass(frozen=True)
class Installed:
    """A plugin made importable: its entry points and the PYTHONPATH entries it needs."""

    distribution: str
    entry_points: dict[str, str]
    paths: tuple[str, ...]


def install_source(source: Path, target: Path) -> Installed:
    """Make the plugin in `source` (a folder with a pyproject.toml declaring
    `[project.entry-points.llmos]`) discoverable from `target`, like an editable install."""
    project = tomllib.loads((source / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    name, version = project["name"], project.get("version", "0")
    points: dict[str, str] = dict(project.get("entry-points", {}).get("llmos", {}))
    dist_info = target / f"{name.replace('-', '_')}-{version}.dist-info"
    dist_info.mkdir(parents=True, exist_ok=True)
    (dist_info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n", encoding="utf-8"
    )
    lines = "".join(f"{key} = {value}\n" for key, value in points.items())
    (dist_info / "entry_points.txt").write_text(f"[llmos]\n{lines}", encoding="utf-8")
    code = source / "src" if (source / "src").is_dir() else source
    return Installed(name, points, (str(target), str(code)))


def pythonpath(*installed: Installed) -> str:
    """A PYTHONPATH value with every installed plugin and the current one."""
    paths = [path for item in installed for path in item.paths]
    current = os.environ.get("PYTHONPATH", "")
    return os.pathsep.join([*paths, *([current] if current else [])])


class HostClient:
    """A running plugin host and blocking calls to it."""

    def __init__(self, process: subprocess.Popen[bytes], socket: str, log: Path) -> None:
        self.process = process
        self.socket = socket
        self.log = log
        self.channel = grpc.insecure_channel(f"unix:{socket}")
        self.stub = plugin_pb2_grpc.PluginHostServiceStub(self.channel)

    def wait_serving(self, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        health = health_pb2_grpc.HealthStub(self.channel)
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"the plugin host exited with {self.process.returncode}:\n"
                    + self.log.read_text(encoding="utf-8", errors="replace")
                )
            with contextlib.suppress(grpc.RpcError):
                reply = health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"the plugin host was not serving after {timeout_s}s")

    def manifest(self) -> dict[str, Any]:
        reply = self.stub.GetManifest(plugin_pb2.PluginHostServiceGetManifestRequest(), timeout=5)
        return json_format.MessageToDict(reply.manifest)

    def isolation(self) -> str:
        reply = self.stub.GetManifest(plugin_pb2.PluginHostServiceGetManifestRequest(), timeout=5)
        return str(reply.isolation)

    def call_hook(self, hook: str, timeout: float = 10, **arguments: Any) -> dict[str, Any]:
        request = plugin_pb2.PluginHostServiceCallHookRequest(hook=hook)
        request.arguments.update(arguments)
        reply = self.stub.CallHook(request, timeout=timeout)
        return json_format.MessageToDict(reply.result)

    def list_tools(self) -> list[plugin_pb2.Tool]:
        reply = self.stub.ListTools(plugin_pb2.PluginHostServiceListToolsRequest(), timeout=5)
        return list(reply.tools)

    def invoke_tool(self, name: str, timeout: float = 10, **arguments: Any) -> dict[str, Any]:
        data = struct_pb2.Struct()
        data.update(arguments)
        reply = self.stub.InvokeTool(
            plugin_pb2.PluginHostServiceInvokeToolRequest(name=name, input=data), timeout=timeout
        )
        return json_format.MessageToDict(reply.output)

    def list_commands(self) -> list[plugin_pb2.PluginCommand]:
        reply = self.stub.ListCommands(plugin_pb2.PluginHostServiceListCommandsRequest(), timeout=5)
        return list(reply.commands)

    def run_command(self, name: str, *args: str, timeout: float = 10) -> str:
        reply = self.stub.RunCommand(
            plugin_pb2.PluginHostServiceRunCommandRequest(name=name, args=args), timeout=timeout
        )
        return str(reply.output)

    def stop(self) -> int:
        self.channel.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@contextlib.contextmanager
def run_host(
    source: Path, *, entry_point: str = "", config: dict[str, Any] | None = None
) -> Iterator[HostClient]:
    """Install the plugin in `source` into a temporary folder and run it in a plugin host.
    `config` is written as its settings file (`<data_dir>/plugins/<name>.toml`)."""
    workdir = Path(tempfile.mkdtemp(prefix="llmos-plugin-"))  # short: a socket lives here
    try:
        installed = install_source(source, workdir / "site")
        point = entry_point or next(iter(installed.entry_points))
        config_file = workdir / "plugin.toml"
        config_file.write_text(
            "".join(f"{key} = {value!r}\n" for key, value in (config or {}).items()),
            encoding="utf-8",
        )
        socket, log = str(workdir / "host.sock"), workdir / "host.log"
        env = {**os.environ, "PYTHONPATH": pythonpath(installed), "PYTHONUNBUFFERED": "1"}
        argv = [sys.executable, "-m", "llmos.plugins.host", "--entry-point", point]
        with log.open("wb") as out:
            process = subprocess.Popen(
                [*argv, "--socket", socket, "--config", str(config_file), "--log-format", "text"],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        client = HostClient(process, socket, log)
        try:
            client.wait_serving()
            yield client
        finally:
            client.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def llmos_plugin() -> Iterator[Callable[..., HostClient]]:
    """`llmos_plugin(source_folder, entry_point="", config=None)`: a running host."""
    with contextlib.ExitStack() as stack:

        def start(
            source: Path, entry_point: str = "", config: dict[str, Any] | None = None
        ) -> HostClient:
            return stack.enter_context(run_host(source, entry_point=entry_point, config=config))

        yield start
