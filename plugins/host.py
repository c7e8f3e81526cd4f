"""The plugin host: one process per plugin, serving PluginHostService on a Unix socket.

The kernel starts it (`python -m llmos.plugins.host --entry-point NAME --socket PATH`) and
supervises it; so does the author kit's pytest fixture (llmos.plugins.testing). In order:

1. read and validate the plugin's manifest (never trusting what the kernel read);
2. confine the process as the manifest says, before any plugin code runs:
   - `network` not granted: its own, empty network namespace (`unshare(CLONE_NEWNET)`,
     as root; else a user namespace too where unprivileged ones are allowed). Only the
     loopback-less namespace is enforced: files, Unix sockets and the kernel's own socket
     stay reachable. Where neither call is allowed the plugin runs with the network and
     the host says so (`isolation`), which the kernel shows in `llmos plugins info`;
   - `limits.memory_mb`: RLIMIT_AS set to the address space mapped before the plugin is
     imported, plus an allowance for the host's gRPC threads, plus `memory_mb`; an
     allocation past it fails (MemoryError in Python). Virtual, not resident, memory;
   - `storage`: a folder of its own, each file at most the quota (RLIMIT_FSIZE);
3. import the plugin's entry point (an error here ends the process with status 3: the
   kernel records a crash at import and restarts it with backoff);
4. register it with pluggy, refuse hooks the manifest does not list (and typos:
   `check_pending`), call `llmos_startup`, collect its tools and its commands;
5. serve: health, and CallHook / ListTools / InvokeTool / ListCommands / RunCommand, each
   plugin function run in a worker thread so a hung one leaves the host answering (the
   kernel's timeout bounds the call).

The kernel calls with the manifest's timeout and checks every result against the
manifest; this process runs plugin code, so nothing it answers is trusted there.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import dataclasses
import errno
import logging
import os
import re
import resource
import signal
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import pluggy
from google.protobuf import json_format, struct_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from llmos.kernel.supervisor import exit_with_parent
from llmos.plugins import hookspecs
from llmos.plugins.discovery import by_entry_point, find_manifest
from llmos.plugins.manifest import Manifest, ManifestError, load_manifest_file
from llmos.services.errors import (
    FailedPrecondition,
    InvalidArgument,
    LlmosError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)
from llmos.services.grpc_server import new_server
from llmos.services.logs import configure_logging
from llmos.services.rpc_types import Context
from llmos.v1 import plugin_pb2, plugin_pb2_grpc, runtime_pb2, runtime_pb2_grpc

log = logging.getLogger(__name__)

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
# Exit statuses the kernel reads: a bad plugin (manifest, hooks) is not worth restarting
# quickly; a crash at import or in llmos_startup is.
EXIT_BAD_PLUGIN = 2
EXIT_CRASHED = 3
# Hooks the kernel may call through CallHook; the others run in the host itself.
CALLABLE_HOOKS = ("llmos_before_request", "llmos_after_request", "llmos_on_task_event")
MODEL_TOKEN_KEY = "x-llmos-plugin-token"
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
COMMAND_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")


def isolate_network() -> str:
    """Give this process an empty network namespace; say what was enforced."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) == 0:
        return "own network namespace (no interfaces but a down loopback)"
    first = ctypes.get_errno()
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0:
        return "own user and network namespace (no interfaces but a down loopback)"
    second = ctypes.get_errno()
    return (
        "none: the system refused a network namespace "
        f"({errno.errorcode.get(first, first)}, then {errno.errorcode.get(second, second)} "
        "with a user namespace); the plugin can reach the network"
    )


# Address space the host's own gRPC server (its threads' stacks and malloc arenas) takes
# once serving, on top of what is mapped before the plugin is imported (measured: ~0.4 GiB
# with MALLOC_ARENA_MAX=2, which the kernel sets).
HOST_ALLOWANCE_MB = 512


def limit_memory(memory_mb: int) -> int:
    """RLIMIT_AS: the address space mapped now, plus the host's allowance, plus the
    manifest's `memory_mb` for the plugin. Returns the limit in MiB."""
    mapped_kb = 0
    for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
        if line.startswith("VmSize:"):
            mapped_kb = int(line.split()[1])
    limit_mb = mapped_kb // 1024 + HOST_ALLOWANCE_MB + memory_mb
    limit = limit_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return limit_mb


@dataclasses.dataclass
class PluginContext:
    """What `llmos_startup` receives: the model (with `call_model`) and its storage."""

    plugin: str
    model_gateway: str = ""
    model_token: str = ""
    storage_dir: Path | None = None

    def embed(self, texts: list[str], model: str = "") -> list[list[float]]:
        """Embeddings through the kernel's model gateway (the runtime's Embed)."""
        if not self.model_gateway:
            raise PermissionDenied(
                f"plugin {self.plugin!r} has no call_model capability: add "
                "`call_model = true` to [tool.llmos.plugin.capabilities]",
                reason="CAPABILITY_MISSING",
                metadata={"plugin": self.plugin, "capability": "call_model"},
            )
        with grpc.insecure_channel(self.model_gateway) as channel:
            reply = runtime_pb2_grpc.RuntimeServiceStub(channel).Embed(
                runtime_pb2.RuntimeServiceEmbedRequest(model=model, inputs=texts),
                timeout=60,
                metadata=((MODEL_TOKEN_KEY, self.model_token),),
            )
        return [list(embedding.values) for embedding in reply.embeddings]


@dataclasses.dataclass(frozen=True)
class CommandEntry:
    name: str
    help: str
    function: Callable[[list[str]], Any]


@dataclasses.dataclass(frozen=True)
class ToolEntry:
    name: str
    description: str
    input_schema: dict[str, Any]
    function: Callable[[dict[str, Any]], Any]


def _to_struct(data: dict[str, Any], what: str) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    try:
        struct.update(data)
    except (TypeError, ValueError) as error:
        raise LlmosError(f"{what} is not JSON data: {error}", reason="PLUGIN_BAD_RESULT") from error
    return struct


def _to_dict(struct: struct_pb2.Struct) -> dict[str, Any]:
    return json_format.MessageToDict(struct)


class LoadedPlugin:
    """The plugin, imported and registered with pluggy, checked against its manifest."""

    def __init__(self, manifest: Manifest, module: object, context: PluginContext) -> None:
        self.manifest = manifest
        self.context = context
        self.manager = pluggy.PluginManager(hookspecs.PROJECT)
        self.manager.add_hookspecs(hookspecs)
        try:
            self.manager.register(module, name=manifest.name)
            self.manager.check_pending()
        except pluggy.PluginValidationError as error:
            raise ManifestError(
                f"plugin {manifest.name!r}: {error}",
                metadata={"plugin": manifest.name, "field": "hooks"},
            ) from error
        implemented = {
            caller.name for caller in self.manager.get_hookcallers(module) or () if caller.name
        }
        for hook in sorted(implemented - set(manifest.hooks)):
            raise ManifestError(
                f"plugin {manifest.name!r} implements {hook}, which its manifest's 'hooks' "
                "does not list: list it (and the capabilities it needs)",
                metadata={"plugin": manifest.name, "field": "hooks"},
            )
        for hook in [h for h in manifest.hooks if h not in implemented]:
            raise ManifestError(
                f"plugin {manifest.name!r}: its manifest's 'hooks' lists {hook}, which the "
                "plugin does not implement",
                metadata={"plugin": manifest.name, "field": "hooks"},
            )
        self.tools: dict[str, ToolEntry] = {}
        self.commands: dict[str, CommandEntry] = {}

    def start(self, config: dict[str, Any]) -> None:
        """Run llmos_startup, then collect the tools (both in this thread, before serving)."""
        if self.manifest.implements("llmos_startup"):
            self.manager.hook.llmos_startup(config=config, context=self.context)
        if self.manifest.implements("llmos_register_tools"):
            self.manager.hook.llmos_register_tools(register=self._register_tool)
        if self.manifest.implements("llmos_register_commands"):
            self.manager.hook.llmos_register_commands(register=self._register_command)

    def _register_command(self, name: str, help: str, function: Callable[[list[str]], Any]) -> None:
        where = f"plugin {self.manifest.name!r} command {name!r}"
        if not isinstance(name, str) or not COMMAND_NAME.match(name):
            raise ManifestError(
                f"{where}: a command name is lower-case letters, digits, - and _ "
                f"({COMMAND_NAME.pattern})",
                metadata={"plugin": self.manifest.name, "field": "command"},
            )
        if name in self.commands:
            raise ManifestError(
                f"{where} is registered twice",
                metadata={"plugin": self.manifest.name, "field": "command"},
            )
        if not callable(function):
            raise ManifestError(
                f"{where}: function is not callable",
                metadata={"plugin": self.manifest.name, "field": "command"},
            )
        self.commands[name] = CommandEntry(name, str(help or ""), function)

    def _register_tool(
        self,
        name: str,
        description: str,
        input_schema: dict[str, Any],
        function: Callable[[dict[str, Any]], Any],
    ) -> None:
        where = f"plugin {self.manifest.name!r} tool {name!r}"
        if not isinstance(name, str) or not name.replace("_", "").isalnum():
            raise ManifestError(f"{where}: a tool name is letters, digits and _ only")
        if name in self.tools:
            raise ManifestError(f"{where} is registered twice")
        try:
            jsonschema.Draft202012Validator.check_schema(input_schema)
        except jsonschema.SchemaError as error:
            raise ManifestError(
                f"{where}: input_schema is not a JSON Schema: {error.message}"
            ) from error
        if input_schema.get("type") != "object":
            raise ManifestError(f'{where}: input_schema must have "type": "object"')
        self.tools[name] = ToolEntry(name, description, input_schema, function)

    def call(self, hook: str, arguments: dict[str, Any]) -> dict[str, Any]:
        """Call one hook; its result must be None or a dict of JSON data."""
        caller = getattr(self.manager.hook, hook)
        names = [name for name in caller.spec.argnames if name != "__multicall__"]
        results = caller(**{name: arguments.get(name) for name in names})
        result = next((r for r in results if r is not None), None)
        if result is None:
            return {}
        if not isinstance(result, dict):
            raise LlmosError(
                f"plugin {self.manifest.name!r}: {hook} returned {type(result).__name__}, not "
                "a dict or None",
                reason="PLUGIN_BAD_RESULT",
                metadata={"plugin": self.manifest.name, "field": "result"},
            )
        return result


class PluginHostServicer(plugin_pb2_grpc.PluginHostServiceServicer):
    def __init__(self, plugin: LoadedPlugin, isolation: str) -> None:
        self.plugin = plugin
        self.isolation = isolation

    async def GetManifest(
        self, request: plugin_pb2.PluginHostServiceGetManifestRequest, context: Context
    ) -> plugin_pb2.PluginHostServiceGetManifestResponse:
        return plugin_pb2.PluginHostServiceGetManifestResponse(
            manifest=_to_struct(self.plugin.manifest.to_json(), "the manifest"),
            isolation=self.isolation,
        )

    async def CallHook(
        self, request: plugin_pb2.PluginHostServiceCallHookRequest, context: Context
    ) -> plugin_pb2.PluginHostServiceCallHookResponse:
        name = self.plugin.manifest.name
        if request.hook not in hookspecs.HOOKS:
            raise InvalidArgument(
                f"plugin {name!r}: unknown hook {request.hook!r}; known: "
                f"{', '.join(hookspecs.HOOKS)}",
                reason="UNKNOWN_HOOK",
                metadata={"plugin": name, "field": "hook"},
            )
        if request.hook not in CALLABLE_HOOKS or not self.plugin.manifest.implements(request.hook):
            raise FailedPrecondition(
                f"plugin {name!r} does not take {request.hook} calls (its manifest lists "
                f"{', '.join(self.plugin.manifest.hooks) or 'no hooks'})",
                reason="HOOK_NOT_IMPLEMENTED",
                metadata={"plugin": name, "field": "hook"},
            )
        arguments = _to_dict(request.arguments)
        try:
            result = await asyncio.to_thread(self.plugin.call, request.hook, arguments)
        except LlmosError:
            raise
        except Exception as error:
            log.exception("%s raised", request.hook)
            raise _raised(
                self.plugin.manifest,
                f"{request.hook} raised",
                error,
                "PLUGIN_HOOK_FAILED",
                {"plugin": name, "hook": request.hook},
            ) from error
        return plugin_pb2.PluginHostServiceCallHookResponse(
            result=_to_struct(result, f"plugin {name!r}: the result of {request.hook}")
        )

    async def ListTools(
        self, request: plugin_pb2.PluginHostServiceListToolsRequest, context: Context
    ) -> plugin_pb2.PluginHostServiceListToolsResponse:
        return plugin_pb2.PluginHostServiceListToolsResponse(
            tools=[
                plugin_pb2.Tool(
                    name=tool.name,
                    description=tool.description,
                    input_schema=_to_struct(tool.input_schema, f"tool {tool.name}'s schema"),
                )
                for tool in self.plugin.tools.values()
            ]
        )

    async def InvokeTool(
        self, request: plugin_pb2.PluginHostServiceInvokeToolRequest, context: Context
    ) -> plugin_pb2.PluginHostServiceInvokeToolResponse:
        name = self.plugin.manifest.name
        tool = self.plugin.tools.get(request.name)
        if tool is None:
            raise NotFound(
                f"plugin {name!r} has no tool {request.name!r}; it offers "
                f"{sorted(self.plugin.tools) or 'none'}",
                reason="TOOL_NOT_FOUND",
                metadata={"plugin": name, "field": "name"},
            )
        arguments = _to_dict(request.input)
        try:
            jsonschema.validate(arguments, tool.input_schema)
        except jsonschema.ValidationError as error:
            raise InvalidArgument(
                f"tool {name}.{tool.name}: input{_path(error)}: {error.message}",
                reason="BAD_TOOL_INPUT",
                metadata={"plugin": name, "field": f"input{_path(error)}"},
            ) from error
        try:
            output = await asyncio.to_thread(tool.function, arguments)
        except LlmosError:
            raise
        except Exception as error:
            log.exception("tool %s raised", tool.name)
            raise _raised(
                self.plugin.manifest,
                f"tool {tool.name} raised",
                error,
                "PLUGIN_TOOL_FAILED",
                {"plugin": name, "tool": tool.name},
            ) from error
        if not isinstance(output, dict):
            raise LlmosError(
                f"plugin {name!r}: tool {tool.name} returned {type(output).__name__}, not a dict",
                reason="PLUGIN_BAD_RESULT",
                metadata={"plugin": name, "field": "output"},
            )
        return plugin_pb2.PluginHostServiceInvokeToolResponse(
            output=_to_struct(output, f"tool {tool.name}'s output")
        )

    async def ListCommands(
        self, request: plugin_pb2.PluginHostServiceListCommandsRequest, context: Context
    ) -> plugin_pb2.PluginHostServiceListCommandsResponse:
        return plugin_pb2.PluginHostServiceListCommandsResponse(
            commands=[
                plugin_pb2.PluginCommand(name=command.name, help=command.help)
                for command in self.plugin.commands.values()
            ]
        )

    async def RunCommand(
        self, request: plugin_pb2.PluginHostServiceRunCommandRequest, context: Context
    ) -> plugin_pb2.PluginHostServiceRunCommandResponse:
        name = self.plugin.manifest.name
        command = self.plugin.commands.get(request.name)
        if command is None:
            raise NotFound(
                f"plugin {name!r} has no command {request.name!r}; it offers "
                f"{sorted(self.plugin.commands) or 'none'}",
                reason="COMMAND_NOT_FOUND",
                metadata={"plugin": name, "command": request.name},
            )
        try:
            output = await asyncio.to_thread(command.function, list(request.args))
        except LlmosError:
            raise
        except Exception as error:
            log.exception("command %s raised", command.name)
            raise _raised(
                self.plugin.manifest,
                f"command {command.name} raised",
                error,
                "PLUGIN_COMMAND_FAILED",
                {"plugin": name, "command": command.name},
            ) from error
        if output is not None and not isinstance(output, str):
            raise LlmosError(
                f"plugin {name!r}: command {command.name} returned {type(output).__name__}, "
                "not a string or None",
                reason="PLUGIN_BAD_RESULT",
                metadata={"plugin": name, "field": "output"},
            )
        return plugin_pb2.PluginHostServiceRunCommandResponse(output=output or "")


def _raised(
    manifest: Manifest, what: str, error: Exception, reason: str, metadata: dict[str, str]
) -> LlmosError:
    """The error for a plugin function that raised. One stopped by a manifest limit (the
    operating system's own words, EFBIG or MemoryError, do not name the limit) is
    RESOURCE_EXHAUSTED / PLUGIN_LIMIT_EXCEEDED, naming the limit and its field."""
    where = f"plugin {manifest.name!r}: {what}"
    if isinstance(error, OSError) and error.errno == errno.EFBIG:
        return ResourceExhausted(
            f"{where} OSError: a file write went past the storage quota of "
            f"{manifest.storage_quota_mb} MB per file (capabilities.storage.quota_mb): {error}",
            reason="PLUGIN_LIMIT_EXCEEDED",
            metadata={**metadata, "field": "capabilities.storage.quota_mb"},
        )
    if isinstance(error, MemoryError):
        return ResourceExhausted(
            f"{where} MemoryError: an allocation went past the memory limit "
            f"(limits.memory_mb = {manifest.memory_mb}): {error or 'out of memory'}",
            reason="PLUGIN_LIMIT_EXCEEDED",
            metadata={**metadata, "field": "limits.memory_mb"},
        )
    return LlmosError(f"{where} {type(error).__name__}: {error}", reason=reason, metadata=metadata)


def _path(error: jsonschema.ValidationError) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)


def _read_config(path: str) -> dict[str, Any]:
    if not path or not Path(path).is_file():
        return {}
    return tomllib.loads(Path(path).read_text(encoding="utf-8"))


async def serve_plugin(plugin: LoadedPlugin, socket_path: str, isolation: str) -> None:
    """Serve until SIGTERM/SIGINT: health SERVING once listening."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = new_server(MAX_MESSAGE_BYTES)
    plugin_pb2_grpc.add_PluginHostServiceServicer_to_server(
        PluginHostServicer(plugin, isolation), server
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(socket_path)
    server.add_insecure_port(f"unix:{socket_path}")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "plugin %s serving on %s (pid %d; isolation: %s)",
        plugin.manifest.name,
        socket_path,
        os.getpid(),
        isolation,
    )
    await stop.wait()
    await health_servicer.enter_graceful_shutdown()
    await server.stop(1.0)


def load(args: argparse.Namespace) -> tuple[LoadedPlugin, str]:
    """Steps 1-4 of the module docstring; raise ManifestError for a bad plugin."""
    point = by_entry_point(args.entry_point)
    path = find_manifest(point.value, point.dist)
    if path is None:
        raise ManifestError(
            f"plugin {args.entry_point!r} has no manifest",
            metadata={"plugin": args.entry_point, "field": "tool.llmos.plugin"},
        )
    manifest = load_manifest_file(path, entry_point=args.entry_point)
    isolation = "not asked: the manifest grants network"
    if not manifest.grants("network"):
        isolation = isolate_network()
    storage: Path | None = None
    if manifest.grants("storage") and args.storage:
        storage = Path(args.storage)
        storage.mkdir(parents=True, exist_ok=True)
        quota = manifest.storage_quota_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_FSIZE, (quota, quota))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an over-quota write fails, EFBIG
    limit_memory(manifest.memory_mb)
    context = PluginContext(
        plugin=manifest.name,
        model_gateway=args.model_gateway if manifest.grants("call_model") else "",
        model_token=os.environ.pop("LLMOS_PLUGIN_MODEL_TOKEN", ""),
        storage_dir=storage,
    )
    try:
        module = point.load()
    except Exception:
        log.exception("plugin %s crashed at import (%s)", manifest.name, point.value)
        sys.exit(EXIT_CRASHED)
    plugin = LoadedPlugin(manifest, module, context)
    try:
        plugin.start(_read_config(args.config))
    except ManifestError:
        raise
    except Exception:
        log.exception("plugin %s crashed in llmos_startup", manifest.name)
        sys.exit(EXIT_CRASHED)
    return plugin, isolation


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmos-plugin-host")
    parser.add_argument("--entry-point", required=True, help="the plugin's entry-point name")
    parser.add_argument("--socket", required=True, help="Unix socket path to serve on")
    parser.add_argument("--config", default="", help="the plugin's TOML settings file")
    parser.add_argument("--storage", default="", help="its storage folder (with `storage`)")
    parser.add_argument("--model-gateway", default="", help="the kernel's model gateway")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--log-format", default="auto")
    parser.add_argument(
        "--parent-pid", type=int, default=0, help="exit when this process (the kernel) dies"
    )
    args = parser.parse_args(argv)
    if args.parent_pid:
        exit_with_parent(args.parent_pid)
    configure_logging(f"plugin:{args.entry_point}", args.log_level, args.log_format)
    try:
        plugin, isolation = load(args)
    except (ManifestError, LookupError) as error:
        log.error("plugin %s cannot run: %s", args.entry_point, error)
        return EXIT_BAD_PLUGIN
    asyncio.run(serve_plugin(plugin, args.socket, isolation))
    return 0


if __name__ == "__main__":
    sys.exit(main())
