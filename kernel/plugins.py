"""The kernel's plugin supervisor: one host process per plugin, its hooks called and checked.

At kernel start `PluginHosts` reads the plugin list (entry points and manifests, no plugin
code: llmos.plugins.discovery) and starts one plugin host per loadable plugin in the
background (llmos.plugins.host, on a Unix socket in a private run folder), so the kernel
reports SERVING without waiting for them. Each host is supervised like a child of
`llmos up`:

- a host that exits (a crash at import, in a hook, in `llmos_startup`) or that is killed
  because a hook hung past its manifest's timeout is restarted after a backoff
  (0.25 s doubling, at most 10 s); `plugin_max_crashes` within `plugin_crash_window_s`
  disables it, with the last crash and the tail of its log as the recorded reason;
- a host that exits with status 2 (its manifest or hooks are wrong) is marked INVALID at
  once: restarting cannot fix it.

The plugin stages (kernel/stages.py `PluginStage`) call `run_stage`: every enabled plugin
implementing the hook, in name order, each with its manifest's timeout (less when the
task's deadline is nearer), each traced as one step. What a plugin is sent and what of its
answer counts follow its manifest (kernel/plugin_rules.py): no prompt without
`read_prompt`; a change without `modify_prompt` is dropped, counted and traced as a
violation. A plugin that fails refuses the task (UNAVAILABLE / PLUGIN_FAILED) unless the
tenant's policy makes the stage fail open.

Plugins with `call_model` reach the runtime only through the kernel's model gateway (a
RuntimeService with Embed alone, on a Unix socket, each call carrying the plugin's secret
token), so a plugin in its own network namespace can still embed, and one without the
capability gets no token. Tools: `list_tools` and `invoke_tool` (permission from
`tool_grants`, input checked against the tool's JSON Schema). Commands: `list_commands`
and `run_command` (llmos_register_commands), run inside the plugin's host.

Task events (`task_event`) go to every running plugin implementing llmos_on_task_event
through a queue of its own, delivered in order by one background task per plugin: the
task never waits for a plugin, and a failure or a timeout is logged, counted
(llmos_kernel_plugin_calls_total) and noted in the task's trace, nothing more.

`llmos plugins disable` / `enable` are kept across restarts (kernel/plugin_state.py).
Every call to a host is counted and timed on the kernel's /metrics, labelled by plugin
(kernel/metrics.py), as are violations and host restarts.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import fnmatch
import logging
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import jsonschema
from google.protobuf import json_format, struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmos.kernel import metrics as kernel_metrics
from llmos.kernel.model_calls import forward_embed
from llmos.kernel.plugin_rules import (
    AFTER,
    BEFORE,
    BadPluginResult,
    Checked,
    check_result,
    hook_arguments,
)
from llmos.kernel.plugin_state import PluginState
from llmos.kernel.registry import Registry
from llmos.kernel.stages import PluginStage, StageContext, StageResult
from llmos.plugins.discovery import Discovered, discover
from llmos.plugins.host import EXIT_BAD_PLUGIN, MODEL_TOKEN_KEY
from llmos.services.channels import client_options, outgoing_metadata
from llmos.services.config import Settings
from llmos.services.errors import (
    FailedPrecondition,
    InvalidArgument,
    LlmosError,
    NotFound,
    PermissionDenied,
    Unavailable,
    from_rpc_error,
)
from llmos.services.grpc_server import new_server
from llmos.services.rpc_types import Context
from llmos.services.timing import duration, now_timestamp, since
from llmos.v1 import (
    common_pb2,
    kernel_pb2,
    plugin_pb2,
    plugin_pb2_grpc,
    runtime_pb2,
    runtime_pb2_grpc,
)

log = logging.getLogger(__name__)

State = kernel_pb2.PluginState
STARTING, RUNNING = kernel_pb2.PLUGIN_STATE_STARTING, kernel_pb2.PLUGIN_STATE_RUNNING
DISABLED, INVALID = kernel_pb2.PLUGIN_STATE_DISABLED, kernel_pb2.PLUGIN_STATE_INVALID
BLOCKED = kernel_pb2.PLUGIN_STATE_BLOCKED
# How long a host may take to report SERVING, and how long a request waits for a host
# that is (re)starting before counting the plugin as failed.
START_TIMEOUT_S = 30.0
WAIT_FOR_START_S = 10.0
BACKOFF_FIRST_S = 0.25
BACKOFF_MAX_S = 10.0
STOP_TIMEOUT_S = 5.0
LOG_TAIL_LINES = 5
# How long the model gateway waits for a runtime to register, for a call without deadline.
GATEWAY_WAIT_S = 60.0
EVENT = "llmos_on_task_event"
COMMANDS = "llmos_register_commands"
# Task events waiting for one plugin; past this, new ones are dropped (and counted) rather
# than letting a slow plugin make the kernel hold ever more of them.
EVENT_QUEUE = 1000
# Writes a trace step to a task's record (the task runner's store), for a task-event note.
TraceNote = Callable[[common_pb2.TraceStep], Awaitable[None]]


@dataclasses.dataclass(eq=False)
class Plugin:
    """One installed plugin and its host, as the kernel sees it."""

    found: Discovered
    state: State.ValueType
    reason: str = ""
    process: asyncio.subprocess.Process | None = None
    channel: grpc.aio.Channel | None = None
    stub: plugin_pb2_grpc.PluginHostServiceAsyncStub | None = None
    socket: str = ""
    log_path: Path | None = None
    crash_times: collections.deque[float] = dataclasses.field(default_factory=collections.deque)
    crashes: int = 0
    violations: int = 0
    isolation: str = ""
    tools: tuple[plugin_pb2.Tool, ...] = ()
    commands: tuple[plugin_pb2.PluginCommand, ...] = ()
    # Task events for this plugin's llmos_on_task_event, delivered in order by `events_task`.
    events: asyncio.Queue[tuple[str, str, str, str, TraceNote | None]] = dataclasses.field(
        default_factory=lambda: asyncio.Queue(EVENT_QUEUE)
    )
    events_task: asyncio.Task[None] | None = None
    ready: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    supervisor: asyncio.Task[None] | None = None
    # Why the kernel killed the host (a hung hook), for the crash record.
    killed_because: str = ""
    token: str = dataclasses.field(default_factory=lambda: secrets.token_hex(16))

    @property
    def name(self) -> str:
        return self.found.name

    @property
    def manifest(self) -> Any:
        return self.found.manifest


class _HostFailed(Exception):
    """The host did not come up (exited, or not serving in time)."""

    def __init__(self, why: str, status: int | None = None) -> None:
        super().__init__(why)
        self.status = status


def prompt_of(request: kernel_pb2.GenerateRequest) -> str:
    """What hooks call the prompt: the prompt, or a chat request's last message."""
    if request.prompt or not request.messages:
        return request.prompt
    return request.messages[-1].content


def with_prompt(request: kernel_pb2.GenerateRequest, prompt: str) -> kernel_pb2.GenerateRequest:
    """A copy of `request` whose prompt (or last chat message) is `prompt`."""
    changed = kernel_pb2.GenerateRequest()
    changed.CopyFrom(request)
    if changed.prompt or not changed.messages:
        changed.prompt = prompt
    else:
        changed.messages[-1].content = prompt
    return changed


class ModelGateway(runtime_pb2_grpc.RuntimeServiceServicer):
    """Embed for plugins with `call_model`, forwarded to a serving runtime. The other
    RuntimeService methods are left out: they answer UNIMPLEMENTED."""

    def __init__(self, hosts: PluginHosts) -> None:
        self.hosts = hosts

    async def Embed(
        self, request: runtime_pb2.RuntimeServiceEmbedRequest, context: Context
    ) -> runtime_pb2.RuntimeServiceEmbedResponse:
        token = dict(context.invocation_metadata() or ()).get(MODEL_TOKEN_KEY, "")
        plugin = next(
            (
                p
                for p in self.hosts.plugins
                if token and secrets.compare_digest(p.token, str(token))
            ),
            None,
        )
        if plugin is None or not plugin.manifest or not plugin.manifest.grants("call_model"):
            raise PermissionDenied(
                "the model gateway serves plugins with the call_model capability only",
                reason="CAPABILITY_MISSING",
                metadata={"capability": "call_model"},
            )
        # A plugin embeds in llmos_startup, which may run before any runtime has registered
        # (the kernel starts first): wait for one within the call's deadline.
        give_up = time.monotonic() + (context.time_remaining() or GATEWAY_WAIT_S) - 0.5
        while (  # noqa: ASYNC110 - the registry has no notification for this
            not self.hosts.registry.serving(common_pb2.SERVICE_KIND_RUNTIME)
            and time.monotonic() < give_up
        ):
            await asyncio.sleep(0.2)
        return await forward_embed(
            self.hosts.registry, request, context.time_remaining(), f"plugin {plugin.name}"
        )


class PluginHosts:
    """Every installed plugin: discovery, supervision, hook calls, tools, enable/disable."""

    def __init__(self, settings: Settings, registry: Registry) -> None:
        self.settings = settings
        self.registry = registry
        started = time.perf_counter()
        found = discover(settings.load_plugins, settings.disabled_plugins)
        self.saved = PluginState(Path(settings.data_dir) / "plugins")
        self.plugins: list[Plugin] = [_initial(entry, self.saved) for entry in found]
        for plugin in self.plugins:
            kernel_metrics.plugin_known(plugin.name)
        # What reading the plugin list added to the kernel's start (the target).
        self.load_ms = (time.perf_counter() - started) * 1000
        self.run_dir: Path | None = None
        self._gateway: grpc.aio.Server | None = None
        self.gateway_address = ""
        self._closing = False
        self._closing_channels: set[asyncio.Task[None]] = set()
        for plugin in self.plugins:
            log.info(
                "plugin %s: %s%s",
                plugin.name,
                kernel_pb2.PluginState.Name(plugin.state).removeprefix("PLUGIN_STATE_").lower(),
                f" ({plugin.reason})" if plugin.reason else "",
            )
        log.info("plugin list read in %.1f ms: %d plugins", self.load_ms, len(self.plugins))

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        """Start every loadable plugin's host in the background."""
        # Short, private and ours: Unix socket paths are limited to 107 bytes.
        self.run_dir = Path(tempfile.mkdtemp(prefix="llmos-plugins-"))
        if any(p.manifest and p.manifest.grants("call_model") for p in self.plugins):
            await self._start_gateway(self.run_dir / "models.sock")
        for index, plugin in enumerate(self.plugins):
            plugin.socket = str(self.run_dir / f"{index}.sock")
            plugin.log_path = Path(self.settings.data_dir) / "plugins" / f"{plugin.name}.log"
            if plugin.state == STARTING:
                self._launch(plugin)

    async def _start_gateway(self, path: Path) -> None:
        server = new_server(self.settings.max_message_bytes)
        runtime_pb2_grpc.add_RuntimeServiceServicer_to_server(ModelGateway(self), server)  # type: ignore[abstract]
        server.add_insecure_port(f"unix:{path}")
        await server.start()
        self._gateway, self.gateway_address = server, f"unix:{path}"

    async def close(self) -> None:
        self._closing = True
        for plugin in self.plugins:
            if plugin.events_task is not None:
                plugin.events_task.cancel()
        await asyncio.gather(
            *(p.events_task for p in self.plugins if p.events_task is not None),
            return_exceptions=True,
        )
        await asyncio.gather(*(self._stop(p) for p in self.plugins), return_exceptions=True)
        await asyncio.gather(*self._closing_channels, return_exceptions=True)
        if self._gateway is not None:
            await self._gateway.stop(1.0)
        if self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def _launch(self, plugin: Plugin) -> None:
        plugin.state, plugin.reason = STARTING, ""
        plugin.supervisor = asyncio.create_task(
            self._supervise(plugin), name=f"plugin-{plugin.name}"
        )

    async def _stop(self, plugin: Plugin) -> None:
        """Stop supervising and stop the host: SIGTERM, then SIGKILL."""
        if plugin.supervisor is not None:
            plugin.supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await plugin.supervisor
            plugin.supervisor = None
        plugin.ready.clear()
        process = plugin.process
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
            try:
                await asyncio.wait_for(process.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        await self._close_channel(plugin)

    async def _close_channel(self, plugin: Plugin) -> None:
        """Retire the host's channel. Closing a grpc.aio channel cancels its calls, and a
        cancelled call raises CancelledError in the task waiting on it (which would
        cancel the request), so calls still in flight get a grace period to fail on
        their own first."""
        channel, plugin.channel, plugin.stub = plugin.channel, None, None
        if channel is not None:
            closing = asyncio.create_task(channel.close(grace=STOP_TIMEOUT_S))
            self._closing_channels.add(closing)
            closing.add_done_callback(self._closing_channels.discard)

    async def _supervise(self, plugin: Plugin) -> None:
        while True:
            plugin.state = STARTING
            plugin.killed_because = ""
            status: int | None = None
            try:
                await self._spawn(plugin)
            except _HostFailed as failed:
                why, status = str(failed), failed.status
            else:
                plugin.state, plugin.reason = RUNNING, ""
                plugin.ready.set()
                assert plugin.process is not None
                status = await plugin.process.wait()
                why = plugin.killed_because or f"its host exited with status {status}"
            plugin.ready.clear()
            await self._close_channel(plugin)
            if self._closing:
                return
            tail = self._log_tail(plugin)
            if status == EXIT_BAD_PLUGIN:
                plugin.state = INVALID
                plugin.reason = f"the plugin host refused it: {tail or why}"
                log.error("plugin %s is invalid: %s", plugin.name, plugin.reason)
                return
            plugin.crashes += 1
            kernel_metrics.plugin_restarted(plugin.name)
            now = time.monotonic()
            plugin.crash_times.append(now)
            window = self.settings.plugin_crash_window_s
            while plugin.crash_times and now - plugin.crash_times[0] > window:
                plugin.crash_times.popleft()
            recent = len(plugin.crash_times)
            last = f"{why}{f'; log: {tail}' if tail else ''}"
            if recent >= self.settings.plugin_max_crashes:
                plugin.state = DISABLED
                plugin.reason = (
                    f"disabled after {recent} crashes within {window:g}s; last: {last}; "
                    "`llmos plugins enable` starts it again"
                )
                log.error("plugin %s: %s", plugin.name, plugin.reason)
                return
            backoff = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (recent - 1))
            plugin.reason = f"restarting in {backoff:g}s after crash {recent}: {last}"
            log.warning("plugin %s: %s", plugin.name, plugin.reason)
            await asyncio.sleep(backoff)

    def _log_tail(self, plugin: Plugin) -> str:
        """The last lines the host wrote, for the crash record."""
        if plugin.log_path is None or not plugin.log_path.is_file():
            return ""
        with plugin.log_path.open("rb") as handle:
            handle.seek(max(0, plugin.log_path.stat().st_size - 8192))
            lines = handle.read().decode("utf-8", "replace").strip().splitlines()
        return " | ".join(line.strip() for line in lines[-LOG_TAIL_LINES:])

    async def _spawn(self, plugin: Plugin) -> None:
        manifest = plugin.manifest
        argv = [
            sys.executable,
            "-m",
            "llmos.plugins.host",
            "--entry-point",
            plugin.found.entry_point,
            "--socket",
            plugin.socket,
            "--parent-pid",
            str(os.getpid()),
            "--config",
            str(Path(self.settings.data_dir) / "plugins" / f"{plugin.name}.toml"),
            "--log-level",
            self.settings.log_level,
            "--log-format",
            "text",
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "MALLOC_ARENA_MAX": "2"}
        if manifest.grants("storage"):
            storage = Path(self.settings.data_dir) / "plugins" / plugin.name / "storage"
            argv += ["--storage", str(storage)]
        if manifest.grants("call_model") and self.gateway_address:
            argv += ["--model-gateway", self.gateway_address]
            env["LLMOS_PLUGIN_MODEL_TOKEN"] = plugin.token
        assert plugin.log_path is not None
        plugin.log_path.parent.mkdir(parents=True, exist_ok=True)
        with plugin.log_path.open("ab") as log_file:
            plugin.process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
            )
        plugin.channel = _host_channel(plugin.socket, self.settings.max_message_bytes)
        plugin.stub = plugin_pb2_grpc.PluginHostServiceStub(plugin.channel)
        await self._wait_serving(plugin)
        reply = await plugin.stub.GetManifest(
            plugin_pb2.PluginHostServiceGetManifestRequest(), timeout=5
        )
        served = json_format.MessageToDict(reply.manifest).get("name")
        if served != plugin.name:
            raise _HostFailed(f"its host serves plugin {served!r}, not {plugin.name!r}")
        plugin.isolation = reply.isolation
        if manifest.grants("register_tools"):
            tools = await plugin.stub.ListTools(
                plugin_pb2.PluginHostServiceListToolsRequest(), timeout=5
            )
            plugin.tools = tuple(self._checked_tools(plugin, tools.tools))
        if manifest.implements(COMMANDS):
            listed = await plugin.stub.ListCommands(
                plugin_pb2.PluginHostServiceListCommandsRequest(), timeout=5
            )
            plugin.commands = tuple(
                plugin_pb2.PluginCommand(name=c.name, help=c.help, plugin=plugin.name)
                for c in listed.commands
            )

    async def _wait_serving(self, plugin: Plugin) -> None:
        assert plugin.channel is not None and plugin.process is not None
        health = health_pb2_grpc.HealthStub(plugin.channel)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if plugin.process.returncode is not None:
                raise _HostFailed(
                    f"its host exited with status {plugin.process.returncode} before serving",
                    plugin.process.returncode,
                )
            with contextlib.suppress(grpc.aio.AioRpcError):
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            await asyncio.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            plugin.process.kill()
        await plugin.process.wait()
        raise _HostFailed(f"its host was not serving after {START_TIMEOUT_S:g}s")

    def _checked_tools(self, plugin: Plugin, tools: Any) -> list[plugin_pb2.Tool]:
        """The host's tools, each schema checked here too (the host runs plugin code)."""
        checked = []
        for tool in tools:
            schema = json_format.MessageToDict(tool.input_schema)
            try:
                jsonschema.Draft202012Validator.check_schema(schema)
            except jsonschema.SchemaError as error:
                _violation(plugin)
                log.warning("plugin %s tool %s dropped: %s", plugin.name, tool.name, error.message)
                continue
            qualified = plugin_pb2.Tool()
            qualified.CopyFrom(tool)
            qualified.name, qualified.plugin = f"{plugin.name}.{tool.name}", plugin.name
            checked.append(qualified)
        return checked

    # -- control ----------------------------------------------------------------------

    def find(self, name: str) -> Plugin:
        for plugin in self.plugins:
            if name in plugin.found.known_as():
                return plugin
        raise NotFound(
            f"no plugin {name!r}; installed: {', '.join(p.name for p in self.plugins) or 'none'}",
            reason="PLUGIN_NOT_FOUND",
            metadata={"plugin": name},
        )

    async def disable(self, name: str) -> Plugin:
        """Stop calling the plugin and stop its host, now."""
        plugin = self.find(name)
        if plugin.state in (INVALID, BLOCKED):
            return plugin  # never started; nothing to stop
        await self._stop(plugin)
        self.saved.set_disabled(plugin.name, True)
        plugin.state, plugin.reason = DISABLED, OPERATOR_DISABLED
        log.info("plugin %s disabled by an operator", plugin.name)
        return plugin

    async def enable(self, name: str) -> Plugin:
        """Start the plugin's host again (a disabled or crash-disabled plugin)."""
        plugin = self.find(name)
        if plugin.state in (INVALID, BLOCKED):
            raise FailedPrecondition(
                f"plugin {plugin.name} cannot be enabled: {plugin.reason}",
                reason="PLUGIN_NOT_LOADABLE",
                metadata={"plugin": plugin.name},
            )
        self.saved.set_disabled(plugin.name, False)
        if plugin.state == DISABLED:
            plugin.crash_times.clear()
            self._launch(plugin)
            log.info("plugin %s enabled by an operator", plugin.name)
        return plugin

    def info(self, plugin: Plugin) -> kernel_pb2.PluginInfo:
        found = plugin.found
        info = kernel_pb2.PluginInfo(
            name=plugin.name,
            version=found.manifest.version if found.manifest else "",
            state=plugin.state,
            reason=plugin.reason,
            entry_point=found.entry_point,
            distribution=found.distribution,
            manifest_path=found.manifest_path,
            pid=plugin.process.pid if plugin.process and plugin.state == RUNNING else 0,
            crashes=plugin.crashes,
            violations=plugin.violations,
            isolation=plugin.isolation,
        )
        if found.manifest is not None:
            info.manifest.update(found.manifest.to_json())
        return info

    # -- hooks ------------------------------------------------------------------------

    def holds_output(self) -> bool:
        """Whether a request's output must be held for plugins:after: an enabled plugin
        implementing llmos_after_request holds `modify_output`, so it may replace it."""
        return any(
            p.manifest is not None
            and p.manifest.implements(AFTER)
            and p.manifest.grants("modify_output")
            and p.state in (STARTING, RUNNING)
            for p in self.plugins
        )

    async def run_stage(self, stage: PluginStage, ctx: StageContext) -> StageResult:
        """Call `stage.hook` on every enabled plugin implementing it (see the module doc)."""
        called = [
            p
            for p in self.plugins
            if p.manifest is not None
            and p.manifest.implements(stage.hook)
            and p.state in (STARTING, RUNNING)
        ]
        if not called:
            return StageResult(
                (
                    common_pb2.TraceStep(
                        stage=stage.name,
                        started_at=now_timestamp(),
                        duration=duration(0.0),
                        decision="skipped",
                        reason=f"no enabled plugin implements {stage.hook}",
                        evidence={"policy": stage.policy},
                    ),
                )
            )
        assert ctx.request is not None
        request, changed = ctx.request, False
        output, output_changed = ctx.output, False
        steps: list[common_pb2.TraceStep] = []
        for plugin in called:
            step, new_request, new_output, error = await self._call(
                stage, plugin, ctx, request, output
            )
            steps.append(step)
            if new_request is not None:
                request, changed = new_request, True
            if new_output is not None:
                output, output_changed = new_output, True
            if error is not None:
                return StageResult(tuple(steps), request if changed else None, error)
        return StageResult(
            tuple(steps), request if changed else None, output=output if output_changed else None
        )

    async def _call(
        self,
        stage: PluginStage,
        plugin: Plugin,
        ctx: StageContext,
        request: kernel_pb2.GenerateRequest,
        output: str | None,
    ) -> tuple[
        common_pb2.TraceStep, kernel_pb2.GenerateRequest | None, str | None, LlmosError | None
    ]:
        manifest = plugin.manifest
        clock = time.monotonic()
        step = common_pb2.TraceStep(
            stage=stage.name, service=f"plugin:{plugin.name}", started_at=now_timestamp()
        )
        step.evidence.update({"policy": stage.policy, "plugin": plugin.name, "hook": stage.hook})

        def remaining(limit: float) -> float:
            if ctx.deadline_s is None:
                return limit
            return max(0.001, min(limit, ctx.deadline_s - time.monotonic()))

        if not plugin.ready.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(plugin.ready.wait(), remaining(WAIT_FOR_START_S))
        if plugin.stub is None or not plugin.ready.is_set():
            return self._failed(
                stage,
                plugin,
                step,
                clock,
                f"its host is not running ({plugin.reason or 'starting'})",
            )
        prompt = prompt_of(request)
        text = prompt if stage.hook == BEFORE else (output or "")
        arguments = hook_arguments(
            manifest,
            stage.hook,
            tenant=ctx.tenant,
            task_id=ctx.task_id,
            prompt=prompt,
            messages=[{"role": m.role, "content": m.content} for m in request.messages]
            if request.messages
            else None,
            output=output,
        )
        timeout = remaining(manifest.timeout_ms / 1000)
        try:
            result = await self.call_hook(plugin, stage.hook, arguments, timeout)
            checked = check_result(manifest, stage.hook, text, result)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                why = (
                    f"{stage.hook} timed out after {timeout * 1000:.0f} ms "
                    f"(limit {manifest.timeout_ms} ms)"
                )
                await self._kill_hung(plugin, why)
            elif error.code() == grpc.StatusCode.UNAVAILABLE:
                why = f"its host is down: {error.details()}"
            else:
                why = f"{error.code().name}: {error.details()}"
            return self._failed(stage, plugin, step, clock, why)
        except BadPluginResult as bad:
            _violation(plugin)
            return self._failed(stage, plugin, step, clock, bad.message)
        new_request, new_output, refusal = _apply(
            stage, plugin, ctx, step, checked, request=request, text=text
        )
        step.duration.CopyFrom(since(clock))
        return step, new_request, new_output, refusal

    def _failed(
        self, stage: PluginStage, plugin: Plugin, step: common_pb2.TraceStep, clock: float, why: str
    ) -> tuple[common_pb2.TraceStep, None, None, LlmosError | None]:
        step.duration.CopyFrom(since(clock))
        log.warning("plugin %s at %s: %s", plugin.name, stage.name, why)
        if stage.fail_open:
            step.decision = "failed_open"
            step.reason = f"plugin failed; policy {stage.policy} lets {stage.name} fail open: {why}"
            return step, None, None, None
        step.decision, step.reason = "failed", why
        return (
            step,
            None,
            None,
            Unavailable(
                f"{stage.name}: plugin {plugin.name} failed ({why}); the request is refused "
                f"(fail closed, policy {stage.policy})",
                reason="PLUGIN_FAILED",
                metadata={"stage": stage.name, "policy": stage.policy, "plugin": plugin.name},
            ),
        )

    async def _kill_hung(self, plugin: Plugin, why: str) -> None:
        """A hook that hung holds a worker thread of its host for good: kill the host, which
        the supervisor restarts (with backoff) and counts as a crash."""
        process = plugin.process
        if process is None or process.returncode is not None:
            return
        plugin.killed_because = f"killed: {why}"
        plugin.ready.clear()
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGKILL)

    async def call_hook(
        self, plugin: Plugin, hook: str, arguments: dict[str, Any], timeout: float
    ) -> dict[str, Any]:
        """One CallHook on the plugin's host; the result as a dict. Counted and timed."""
        assert plugin.stub is not None
        request = plugin_pb2.PluginHostServiceCallHookRequest(hook=hook)
        request.arguments.update(arguments)
        async with _counted(plugin, hook):
            reply = await plugin.stub.CallHook(
                request, timeout=timeout, metadata=outgoing_metadata()
            )
        return json_format.MessageToDict(reply.result)

    # -- task events ------------------------------------------------------------------

    def task_event(
        self, task_id: str, tenant: str, state: str, reason: str, note: TraceNote | None = None
    ) -> None:
        """Queue a task's new state for every enabled plugin implementing
        llmos_on_task_event; returns at once (never blocks or fails the task). `note`
        writes a trace step to the task when a plugin fails to take the event."""
        for plugin in self.plugins:
            if (
                plugin.manifest is None
                or not plugin.manifest.implements(EVENT)
                or plugin.state not in (STARTING, RUNNING)
            ):
                continue
            try:
                plugin.events.put_nowait((task_id, tenant, state, reason, note))
            except asyncio.QueueFull:
                kernel_metrics.plugin_called(plugin.name, EVENT, "dropped")
                log.warning("plugin %s: task event dropped, its queue is full", plugin.name)
                continue
            if plugin.events_task is None or plugin.events_task.done():
                plugin.events_task = asyncio.create_task(
                    self._deliver_events(plugin), name=f"plugin-{plugin.name}-events"
                )

    async def _deliver_events(self, plugin: Plugin) -> None:
        """Deliver `plugin`'s queued task events one at a time, each with its timeout."""
        while True:
            task_id, tenant, state, reason, note = await plugin.events.get()
            if plugin.state in (STARTING, RUNNING) and not plugin.ready.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(plugin.ready.wait(), WAIT_FOR_START_S)
            why = ""
            if plugin.stub is None or not plugin.ready.is_set():
                kernel_metrics.plugin_called(plugin.name, EVENT, "dropped")
                why = f"its host is not running ({plugin.reason or 'starting'})"
            else:
                timeout = plugin.manifest.timeout_ms / 1000
                arguments = {"task_id": task_id, "tenant": tenant, "state": state}
                arguments["reason"] = reason
                try:
                    await self.call_hook(plugin, EVENT, arguments, timeout)
                except grpc.aio.AioRpcError as error:
                    why = f"{error.code().name}: {error.details()}"
                    if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                        why = f"{EVENT} timed out after {timeout * 1000:.0f} ms"
                        await self._kill_hung(plugin, why)
            if why:
                log.warning("plugin %s: task event %s of %s: %s", plugin.name, state, task_id, why)
                if note is not None:
                    with contextlib.suppress(Exception):  # a note must never stop delivery
                        await note(_event_step(plugin, state, why))

    # -- commands ---------------------------------------------------------------------

    def list_commands(self) -> list[plugin_pb2.PluginCommand]:
        return [command for p in self.plugins if p.state == RUNNING for command in p.commands]

    async def run_command(self, plugin_name: str, command: str, args: list[str]) -> str:
        """Run a plugin's command in its host, with the manifest's timeout."""
        plugin = self.find(plugin_name)
        known = [c.name for c in plugin.commands]
        if plugin.state != RUNNING or plugin.stub is None:
            raise FailedPrecondition(
                f"plugin {plugin.name} is not running "
                f"({kernel_pb2.PluginState.Name(plugin.state)}: {plugin.reason or 'starting'}); "
                "its commands run in its host",
                reason="PLUGIN_NOT_RUNNING",
                metadata={"plugin": plugin.name},
            )
        if command not in known:
            raise NotFound(
                f"plugin {plugin.name} has no command {command!r}; it offers "
                f"{', '.join(known) or 'none'} (see `llmos plugins commands`)",
                reason="COMMAND_NOT_FOUND",
                metadata={"plugin": plugin.name, "command": command},
            )
        timeout = plugin.manifest.timeout_ms / 1000
        try:
            async with _counted(plugin, "command"):
                reply = await plugin.stub.RunCommand(
                    plugin_pb2.PluginHostServiceRunCommandRequest(name=command, args=args),
                    timeout=timeout,
                    metadata=outgoing_metadata(),
                )
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                await self._kill_hung(
                    plugin, f"command {command} timed out after {timeout * 1000:.0f} ms"
                )
            raise from_rpc_error(error, f"command {command} of plugin {plugin.name}") from error
        return str(reply.output)

    # -- tools ------------------------------------------------------------------------

    def list_tools(self) -> list[plugin_pb2.Tool]:
        return [tool for p in self.plugins if p.state == RUNNING for tool in p.tools]

    def permitted(self, tenant: str, tool: str) -> bool:
        return any(fnmatch.fnmatchcase(f"{tenant}:{tool}", g) for g in self.settings.tool_grants)

    async def invoke_tool(
        self, tenant: str, name: str, arguments: struct_pb2.Struct, deadline_s: float | None
    ) -> tuple[struct_pb2.Struct, common_pb2.TraceStep]:
        """Check permission and input, run the tool; return its output and a trace step."""
        clock = time.monotonic()
        plugin_name, _, tool_name = name.partition(".")
        if not tool_name:
            raise InvalidArgument(
                f"tool name {name!r} must be '<plugin>.<tool>', as ListTools names it",
                reason="BAD_TOOL_NAME",
                metadata={"field": "name"},
            )
        plugin = self.find(plugin_name)
        tool = next((t for t in plugin.tools if t.name == name), None)
        if tool is None or plugin.state != RUNNING:
            raise NotFound(
                f"no tool {name!r} is offered now (plugin {plugin.name} is "
                f"{kernel_pb2.PluginState.Name(plugin.state)}; its tools: "
                f"{[t.name for t in plugin.tools] or 'none'})",
                reason="TOOL_NOT_FOUND",
                metadata={"field": "name"},
            )
        if not self.permitted(tenant, name):
            raise PermissionDenied(
                f"tenant {tenant!r} may not invoke {name}: add '{tenant}:{name}' to the "
                "tool_grants setting",
                reason="TOOL_NOT_GRANTED",
                metadata={"tenant": tenant, "tool": name},
            )
        data = json_format.MessageToDict(arguments)
        try:
            jsonschema.validate(data, json_format.MessageToDict(tool.input_schema))
        except jsonschema.ValidationError as error:
            field = "input" + "".join(
                f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path
            )
            raise InvalidArgument(
                f"tool {name}: {field}: {error.message}",
                reason="BAD_TOOL_INPUT",
                metadata={"tool": name, "field": field},
            ) from error
        assert plugin.stub is not None
        timeout = plugin.manifest.timeout_ms / 1000
        if deadline_s is not None:
            timeout = max(0.001, min(timeout, deadline_s - time.monotonic()))
        step = common_pb2.TraceStep(
            stage="tool", service=f"plugin:{plugin.name}", started_at=now_timestamp()
        )
        step.evidence.update({"tool": name, "tenant": tenant})
        try:
            async with _counted(plugin, "tool"):
                reply = await plugin.stub.InvokeTool(
                    plugin_pb2.PluginHostServiceInvokeToolRequest(name=tool_name, input=arguments),
                    timeout=timeout,
                    metadata=outgoing_metadata(),
                )
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                await self._kill_hung(
                    plugin, f"tool {name} timed out after {timeout * 1000:.0f} ms"
                )
            raise from_rpc_error(error, f"tool {name} on plugin {plugin.name}") from error
        step.decision, step.reason = "invoked", "input matched the tool's schema"
        step.duration.CopyFrom(since(clock))
        return reply.output, step


OPERATOR_DISABLED = "disabled by an operator (`llmos plugins enable` starts it again)"


def _initial(found: Discovered, saved: PluginState) -> Plugin:
    if found.error is not None:
        return Plugin(found, INVALID, found.error.message)
    if found.blocked:
        return Plugin(found, BLOCKED, found.blocked)
    if found.name in saved.disabled:
        return Plugin(found, DISABLED, f"{OPERATOR_DISABLED}; kept across restarts in {saved.path}")
    return Plugin(found, STARTING)


def _apply(
    stage: PluginStage,
    plugin: Plugin,
    ctx: StageContext,
    step: common_pb2.TraceStep,
    checked: Checked,
    *,
    request: kernel_pb2.GenerateRequest,
    text: str,
) -> tuple[kernel_pb2.GenerateRequest | None, str | None, LlmosError | None]:
    """What a checked hook result does: the request or output it passes on, the refusal
    it makes, and how `step` records it (a violation, a change, a block)."""
    new_request: kernel_pb2.GenerateRequest | None = None
    new_output: str | None = None
    step.decision, step.reason = "allow", "no change"
    if checked.violations:
        _violation(plugin, len(checked.violations))
        step.evidence["violation"] = ",".join(checked.violations)
        step.decision = "violation"
        step.reason = (
            f"the plugin changed the {'prompt' if stage.hook == BEFORE else 'output'} "
            f"without {' and '.join(checked.violations)}; the change was dropped"
        )
        log.warning("plugin %s: %s", plugin.name, step.reason)
    elif checked.text is not None and stage.hook == BEFORE:
        new_request = with_prompt(request, checked.text)
        step.decision, step.reason = "modified", "the plugin changed the prompt"
        step.evidence["prompt_chars"] = f"{len(text)}->{len(checked.text)}"
    elif checked.text is not None and stage.hook == AFTER and ctx.output_held:
        new_output = checked.text
        step.decision = "modified"
        step.reason = "the plugin changed the output; the client gets the changed output"
        step.evidence["output_chars"] = f"{len(text)}->{len(checked.text)}"
    elif checked.text is not None and stage.hook == AFTER:
        # It gained modify_output while this request's output was already streaming.
        step.decision = "modified"
        step.reason = (
            "output change allowed but not applied: the output was not held for this "
            "request (the plugin was enabled after it started streaming)"
        )
    if stage.hook == AFTER and ctx.output_held:
        step.evidence["output_held"] = "true"
    refusal: LlmosError | None = None
    if checked.blocked:
        step.decision, step.reason = "block", checked.reason or "blocked by the plugin"
        refusal = PermissionDenied(
            f"refused by plugin {plugin.name} at {stage.name}: {step.reason}",
            reason="REFUSED_BY_PLUGIN",
            metadata={"plugin": plugin.name, "stage": stage.name},
        )
    return new_request, new_output, refusal


@contextlib.asynccontextmanager
async def _counted(plugin: Plugin, hook: str) -> AsyncIterator[None]:
    """Count and time one call to `plugin`'s host: ok, failed or timeout."""
    clock = time.monotonic()
    try:
        yield
    except grpc.aio.AioRpcError as error:
        timed_out = error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        outcome = "timeout" if timed_out else "failed"
        kernel_metrics.plugin_called(plugin.name, hook, outcome, time.monotonic() - clock)
        raise
    kernel_metrics.plugin_called(plugin.name, hook, "ok", time.monotonic() - clock)


def _event_step(plugin: Plugin, state: str, why: str) -> common_pb2.TraceStep:
    """The trace note of a task event a plugin did not take (the task went on)."""
    return common_pb2.TraceStep(
        stage="plugins:event",
        service=f"plugin:{plugin.name}",
        started_at=now_timestamp(),
        decision="failed",
        reason=f"{EVENT}({state}) failed: {why}; the task was not affected",
        evidence={"plugin": plugin.name, "hook": EVENT, "state": state},
    )


def _violation(plugin: Plugin, count: int = 1) -> None:
    plugin.violations += count
    kernel_metrics.plugin_violated(plugin.name, count)


def _host_channel(socket: str, max_message_bytes: int) -> grpc.aio.Channel:
    """A channel to a plugin host, without the stack's retry policy: a call that crashed
    the host would crash it again on every retry."""
    options = [
        (key, value)
        for key, value in client_options(max_message_bytes)
        if key not in ("grpc.enable_retries", "grpc.service_config")
    ]
    return grpc.aio.insecure_channel(
        f"unix:{socket}", options=[*options, ("grpc.enable_retries", 0)]
    )
