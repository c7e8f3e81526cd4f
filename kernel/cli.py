"""The `llmos` command: run the stack (`up`, `serve`) and talk to it (`status`, `generate`, `chat`).

Every subcommand builds its settings with the one loader (`llmos.services.config`):
flags > LLMOS_* environment > config file > defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmos import __version__
from llmos.kernel.registry import HEALTH_NAMES, KIND_NAMES
from llmos.services.channels import open_channel
from llmos.services.config import Settings, load_settings
from llmos.services.errors import LlmosError, error_info
from llmos.services.logs import configure_logging
from llmos.v1 import common_pb2, kernel_pb2, kernel_pb2_grpc


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {
        "host": args.host,
        "port": args.port,
        "data_dir": args.data_dir,
        "model": getattr(args, "model", None),
        "log_level": getattr(args, "log_level", None),
    }
    return load_settings(overrides, config_file=args.config)


# ---------------------------------------------------------------- running the stack


def cmd_serve(args: argparse.Namespace) -> int:
    from llmos.kernel.stack import BY_NAME
    from llmos.kernel.supervisor import exit_with_parent_from_env
    from llmos.services.serve import serve

    exit_with_parent_from_env()
    settings = _settings(args)
    configure_logging(args.name, settings.log_level, settings.log_format)
    spec = BY_NAME[args.name]
    asyncio.run(serve(spec.build(settings), settings, name=spec.name, port=spec.port(settings)))
    return 0


def cmd_prepare_model(args: argparse.Namespace) -> int:
    from llmos.services.runtime.models import resolve_model_dir

    settings = _settings(args)
    path = resolve_model_dir(settings.model, settings.data_dir, progress=_progress)
    _progress(f"model ready: {path}")
    return 0


def _progress(message: str) -> None:
    print(f"llmos: {message}", file=sys.stderr, flush=True)


def cmd_up(args: argparse.Namespace) -> int:
    import subprocess

    from llmos.kernel.stack import STACK
    from llmos.kernel.supervisor import Child, RestartIntensity, Supervisor, child_argv
    from llmos.services.runtime.models import CATALOGUE, converted_dir, is_model_dir

    settings = _settings(args)
    configure_logging("supervisor", settings.log_level, settings.log_format)
    passed = _passed_options(args)
    if (
        settings.runtime_engine != "echo"  # the echo engine loads no model
        and settings.model in CATALOGUE
        and not is_model_dir(converted_dir(settings.data_dir, settings.model))
    ):
        # The longest wait a newcomer meets: run it in the foreground, with its progress.
        prepare = [sys.executable, "-m", "llmos.kernel.cli", "prepare-model", *passed]
        if subprocess.run(prepare, check=False).returncode != 0:
            _progress("model preparation failed; see the messages above")
            return 1
    children = [
        Child(
            id=spec.name,
            argv=child_argv(spec.name, *passed),
            address=f"{settings.host}:{spec.port(settings)}",
            shutdown_timeout_s=settings.shutdown_grace_s + 5,
        )
        for spec in STACK
    ]
    supervisor = Supervisor(
        children,
        RestartIntensity(settings.max_restarts, settings.restart_window_s),
        settings.ready_timeout_s,
    )
    return asyncio.run(supervisor.run())


def _passed_options(args: argparse.Namespace) -> list[str]:
    """The common flags given to `up`, handed on to every child unchanged."""
    passed: list[str] = []
    for flag in ("host", "port", "data_dir", "config", "log_level", "model"):
        value = getattr(args, flag, None)
        if value is not None:
            passed += [f"--{flag.replace('_', '-')}", str(value)]
    return passed


# ---------------------------------------------------------------- talking to the stack


def _fail(error: grpc.aio.AioRpcError) -> int:
    info = error_info(error)
    reason = f" [{info.reason}]" if info is not None else ""
    print(f"llmos: {error.code().name}{reason}: {error.details()}", file=sys.stderr)
    return 1


async def _status(settings: Settings, as_json: bool) -> int:
    target = settings.kernel_target
    async with open_channel(target) as channel:
        try:
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=3
            )
            kernel_serving = health.status == health_pb2.HealthCheckResponse.SERVING
            reply = await kernel_pb2_grpc.KernelServiceStub(channel).ListServices(
                kernel_pb2.ListServicesRequest(), timeout=3
            )
        except grpc.aio.AioRpcError as error:
            print(
                f"llmos: the kernel at {target} is not reachable: {error.details()}",
                file=sys.stderr,
            )
            return 1
    kernel_state = "SERVING" if kernel_serving else "NOT_SERVING"
    rows = [("kernel", target, "-", kernel_state, _kernel_metrics_address(settings))]
    rows += [
        (
            s.name,
            s.address,
            str(s.pid),
            HEALTH_NAMES.get(s.health, "UNSPECIFIED"),
            s.metrics_address or "-",
        )
        for s in reply.services
    ]
    registered = {KIND_NAMES.get(s.kind, "?") for s in reply.services}
    missing = [kind for kind in settings.expected_services if kind not in registered]
    rows += [(kind, "-", "-", "MISSING", "-") for kind in missing]
    healthy = all(row[3] == "SERVING" for row in rows)
    if as_json:
        keys = ("name", "address", "pid", "health", "metrics_address")
        print(
            json.dumps(
                {"healthy": healthy, "services": [dict(zip(keys, r, strict=True)) for r in rows]}
            )
        )
    else:
        print(f"{'SERVICE':<10} {'ADDRESS':<22} {'PID':<8} {'HEALTH':<12} METRICS")
        for name, address, pid, state, metrics in rows:
            print(f"{name:<10} {address:<22} {pid:<8} {state:<12} {metrics}")
    return 0 if healthy else 1


def _kernel_metrics_address(settings: Settings) -> str:
    """Where the kernel serves /metrics. The kernel is not in its own registry, so this
    follows the same rule it does (`Settings.metrics_port_for`), like its address does."""
    host, _, port = settings.kernel_target.rpartition(":")
    metrics_port = settings.metrics_port_for(int(port) if port.isdigit() else settings.port)
    return "-" if metrics_port is None else f"{host}:{metrics_port}"


def _sampling(args: argparse.Namespace) -> common_pb2.SamplingParams:
    params = common_pb2.SamplingParams()
    if args.max_tokens is not None:
        params.max_tokens = args.max_tokens
    if args.temperature is not None:
        params.temperature = args.temperature
    if args.seed is not None:
        params.seed = args.seed
    return params


async def _stream(
    stub: kernel_pb2_grpc.KernelServiceAsyncStub,
    request: kernel_pb2.GenerateRequest,
    timeout: float | None,
) -> tuple[str, kernel_pb2.GenerateResponse | None]:
    """Print a completion as it arrives; return its text and final message."""
    text: list[str] = []
    last = None
    async for piece in stub.Generate(request, timeout=timeout):
        sys.stdout.write(piece.text)
        sys.stdout.flush()
        text.append(piece.text)
        last = piece
    sys.stdout.write("\n")
    return "".join(text), last


async def _generate(settings: Settings, args: argparse.Namespace) -> int:
    request = kernel_pb2.GenerateRequest(
        prompt=args.prompt, model=args.model_name or "", sampling=_sampling(args)
    )
    async with open_channel(settings.kernel_target) as channel:
        stub = kernel_pb2_grpc.KernelServiceStub(channel)
        try:
            _, last = await _stream(stub, request, args.timeout)
        except grpc.aio.AioRpcError as error:
            return _fail(error)
    if args.usage and last is not None:
        usage = last.usage
        first_token_s = usage.time_to_first_token.ToTimedelta().total_seconds()
        print(
            f"[{common_pb2.FinishReason.Name(last.finish_reason)}; "
            f"{usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens; "
            f"first token after {first_token_s:.2f}s]",
            file=sys.stderr,
        )
    return 0


async def _chat(settings: Settings, args: argparse.Namespace) -> int:
    history: list[common_pb2.ChatMessage] = []
    if args.system:
        history.append(common_pb2.ChatMessage(role="system", content=args.system))
    print(
        "llmos chat: type a message; /reset clears the conversation, /exit or Ctrl-D quits.",
        file=sys.stderr,
    )
    async with open_channel(settings.kernel_target) as channel:
        stub = kernel_pb2_grpc.KernelServiceStub(channel)
        while True:
            try:
                line = await asyncio.to_thread(input, "you> ")
            except EOFError:
                print(file=sys.stderr)
                return 0
            if line.strip() in ("/exit", "/quit"):
                return 0
            if line.strip() == "/reset":
                del history[1 if args.system else 0 :]
                continue
            if not line.strip():
                continue
            history.append(common_pb2.ChatMessage(role="user", content=line))
            request = kernel_pb2.GenerateRequest(
                messages=history, model=args.model_name or "", sampling=_sampling(args)
            )
            sys.stdout.write("assistant> ")
            try:
                answer, _ = await _stream(stub, request, args.timeout)
            except grpc.aio.AioRpcError as error:
                history.pop()
                _fail(error)
                continue
            history.append(common_pb2.ChatMessage(role="assistant", content=answer))


async def _probe(address: str, service: str, timeout: float) -> int:
    async with open_channel(address) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.aio.AioRpcError as error:
            print(f"{address}: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{address}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def cmd_status(args: argparse.Namespace) -> int:
    return asyncio.run(_status(_settings(args), args.json))


def cmd_generate(args: argparse.Namespace) -> int:
    return asyncio.run(_generate(_settings(args), args))


def cmd_chat(args: argparse.Namespace) -> int:
    return asyncio.run(_chat(_settings(args), args))


STATE_NAMES = {v: n.removeprefix("TASK_STATE_") for n, v in common_pb2.TaskState.items()}
PRIORITIES = {"interactive": 1, "normal": 2, "batch": 3}


async def _submit(settings: Settings, args: argparse.Namespace) -> int:
    request = kernel_pb2.GenerateRequest(
        prompt=args.prompt,
        model=args.model_name or "",
        sampling=_sampling(args),
        priority=PRIORITIES[args.priority],  # type: ignore[arg-type]
    )
    async with open_channel(settings.kernel_target) as channel:
        try:
            reply = await kernel_pb2_grpc.KernelServiceStub(channel).Submit(
                kernel_pb2.SubmitRequest(request=request), timeout=args.timeout or 30
            )
        except grpc.aio.AioRpcError as error:
            return _fail(error)
    print(reply.task_id)
    return 0


# Tasks asked for per ListTasks call; `llmos tasks` follows next_page_token for more.
TASKS_PAGE_SIZE = 100


async def _tasks(settings: Settings, args: argparse.Namespace) -> int:
    """Print tasks page by page as they arrive, so a long listing starts at once and a
    `--limit` stops asking as soon as it is met."""
    state = common_pb2.TaskState.Value(f"TASK_STATE_{(args.state or 'unspecified').upper()}")
    remaining = args.limit or None  # 0: no limit
    token, shown = "", 0
    print(f"{'TASK':<34} {'TENANT':<10} {'STATE':<10} {'TOKENS':>6}  CREATED")
    async with open_channel(settings.kernel_target) as channel:
        stub = kernel_pb2_grpc.KernelServiceStub(channel)
        while remaining is None or shown < remaining:
            page_size = TASKS_PAGE_SIZE if remaining is None else remaining - shown
            try:
                reply = await stub.ListTasks(
                    kernel_pb2.ListTasksRequest(
                        tenant=args.tenant or "",
                        state=state,
                        page_size=min(page_size, TASKS_PAGE_SIZE),
                        page_token=token,
                    ),
                    timeout=10,
                )
            except grpc.aio.AioRpcError as error:
                return _fail(error)
            for task in reply.tasks:
                created = task.created_at.ToDatetime().strftime("%Y-%m-%d %H:%M:%S")
                print(
                    f"{task.task_id:<34} {task.tenant:<10} "
                    f"{STATE_NAMES.get(task.state, '?'):<10} "
                    f"{task.usage.completion_tokens:>6}  {created}"
                )
            shown += len(reply.tasks)
            token = reply.next_page_token
            if not token:
                return 0
    print(
        f"llmos: the first {shown} shown; more may match: raise --limit (0 shows all)",
        file=sys.stderr,
    )
    return 0


async def _trace(settings: Settings, args: argparse.Namespace) -> int:
    async with open_channel(settings.kernel_target) as channel:
        stub = kernel_pb2_grpc.KernelServiceStub(channel)
        try:
            task = (
                await stub.GetTask(kernel_pb2.GetTaskRequest(task_id=args.task_id), timeout=10)
            ).task
            trace = await stub.GetTrace(
                kernel_pb2.GetTraceRequest(task_id=args.task_id), timeout=10
            )
        except grpc.aio.AioRpcError as error:
            return _fail(error)
    print(f"task {task.task_id}  [{STATE_NAMES.get(task.state, '?')}]  tenant {task.tenant}")
    for index, step in enumerate(trace.steps):
        branch = "└─" if index == len(trace.steps) - 1 else "├─"
        millis = step.duration.ToTimedelta().total_seconds() * 1000
        service = f" @{step.service}" if step.service else ""
        print(f"{branch} {step.stage}{service}: {step.decision} ({millis:.1f} ms)")
        stem = "   " if index == len(trace.steps) - 1 else "│  "
        if step.reason:
            print(f"{stem}   {step.reason}")
        for key, value in sorted(step.evidence.items()):
            print(f"{stem}   {key} = {value}")
    return 0


PLUGIN_STATES = {
    v: n.removeprefix("PLUGIN_STATE_").lower() for n, v in kernel_pb2.PluginState.items()
}


def _print_plugin(plugin: kernel_pb2.PluginInfo) -> None:
    """`llmos plugins info`: every field, the manifest as TOML-like lines."""
    from google.protobuf import json_format

    print(f"plugin {plugin.name} {plugin.version}  [{PLUGIN_STATES.get(plugin.state, '?')}]")
    for label, value in (
        ("reason", plugin.reason),
        ("entry point", plugin.entry_point),
        ("distribution", plugin.distribution),
        ("manifest", plugin.manifest_path),
        ("pid", plugin.pid or ""),
        ("crashes", plugin.crashes),
        ("violations", plugin.violations),
        ("network isolation", plugin.isolation),
    ):
        if value != "":
            print(f"  {label}: {value}")
    manifest = json_format.MessageToDict(plugin.manifest)
    if manifest:
        print(f"  hooks: {', '.join(manifest.get('hooks', [])) or 'none'}")
        granted = [k for k, v in manifest.get("capabilities", {}).items() if v]
        print(f"  capabilities: {', '.join(sorted(granted)) or 'none'}")
        limits = manifest.get("limits", {})
        timeout, memory = limits.get("timeout_ms", 0), limits.get("memory_mb", 0)
        print(f"  limits: timeout {timeout:g} ms, memory {memory:g} MB")


async def _plugins(settings: Settings, args: argparse.Namespace) -> int:
    async with open_channel(settings.kernel_target) as channel:
        stub = kernel_pb2_grpc.KernelServiceStub(channel)
        try:
            if args.action == "list":
                reply = await stub.ListPlugins(kernel_pb2.ListPluginsRequest(), timeout=10)
                print(f"{'PLUGIN':<20} {'VERSION':<10} {'STATE':<10} REASON")
                for plugin in reply.plugins:
                    print(
                        f"{plugin.name:<20} {plugin.version:<10} "
                        f"{PLUGIN_STATES.get(plugin.state, '?'):<10} {plugin.reason}"
                    )
                return 0
            if args.action == "commands":
                return await _plugin_commands(stub)
            if not args.name:
                print(f"llmos: plugins {args.action} needs a plugin name", file=sys.stderr)
                return 2
            if args.action == "run":
                return await _run_plugin_command(stub, args.name, args.rest)
            if args.action == "info":
                got = await stub.GetPlugin(kernel_pb2.GetPluginRequest(name=args.name), timeout=10)
                _print_plugin(got.plugin)
            elif args.action == "enable":
                on = await stub.EnablePlugin(
                    kernel_pb2.EnablePluginRequest(name=args.name), timeout=10
                )
                print(f"{on.plugin.name}: {PLUGIN_STATES.get(on.plugin.state, '?')}")
            else:
                off = await stub.DisablePlugin(
                    kernel_pb2.DisablePluginRequest(name=args.name), timeout=30
                )
                print(f"{off.plugin.name}: {PLUGIN_STATES.get(off.plugin.state, '?')}")
        except grpc.aio.AioRpcError as error:
            return _fail(error)
    return 0


async def _plugin_commands(stub: kernel_pb2_grpc.KernelServiceAsyncStub) -> int:
    """`llmos plugins commands`: what the running plugins registered."""
    reply = await stub.ListPluginCommands(kernel_pb2.ListPluginCommandsRequest(), timeout=10)
    print(f"{'PLUGIN':<20} {'COMMAND':<20} HELP")
    for command in reply.commands:
        print(f"{command.plugin:<20} {command.name:<20} {command.help}")
    return 0


async def _run_plugin_command(
    stub: kernel_pb2_grpc.KernelServiceAsyncStub, plugin: str, rest: list[str]
) -> int:
    """`llmos plugins run PLUGIN COMMAND [ARGS...]`: run in the plugin's host; print it."""
    if not rest:
        print(
            f"llmos: plugins run {plugin} needs a command; `llmos plugins commands` lists them",
            file=sys.stderr,
        )
        return 2
    reply = await stub.RunPluginCommand(
        kernel_pb2.RunPluginCommandRequest(plugin=plugin, command=rest[0], args=rest[1:]),
        timeout=70,  # the host's own limit is the manifest's timeout_ms (at most 60 s)
    )
    if reply.output:
        print(reply.output, end="" if reply.output.endswith("\n") else "\n")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    return asyncio.run(_plugins(_settings(args), args))


def cmd_submit(args: argparse.Namespace) -> int:
    return asyncio.run(_submit(_settings(args), args))


def cmd_tasks(args: argparse.Namespace) -> int:
    return asyncio.run(_tasks(_settings(args), args))


def cmd_trace(args: argparse.Namespace) -> int:
    return asyncio.run(_trace(_settings(args), args))


def cmd_top(args: argparse.Namespace) -> int:
    from llmos.kernel.top import top

    return top(_settings(args), once=args.once, interval=args.interval)


def cmd_probe(args: argparse.Namespace) -> int:
    return asyncio.run(_probe(args.address, args.service, args.timeout))


# ---------------------------------------------------------------- argument parsing


def _common(parser: argparse.ArgumentParser, *, runs_processes: bool = False) -> None:
    parser.add_argument("--host", help="interface to bind / kernel host (LLMOS_HOST)")
    parser.add_argument(
        "--port", type=int, help="kernel port; services use the next ones (LLMOS_PORT)"
    )
    parser.add_argument("--data-dir", help="converted models and llmos.toml (LLMOS_DATA_DIR)")
    parser.add_argument("--config", help="TOML settings file (LLMOS_CONFIG)")
    if runs_processes:
        parser.add_argument("--log-level", help="debug, info, warning, error (LLMOS_LOG_LEVEL)")


def _client(parser: argparse.ArgumentParser) -> None:
    _common(parser)
    parser.add_argument("--model", dest="model_name", help="model to use (default: the runtime's)")
    parser.add_argument("--max-tokens", type=int)
    parser.add_argument("--temperature", type=float, help="0 for greedy decoding")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--timeout", type=float, help="deadline in seconds for each answer")


def count(text: str) -> int:
    """A whole number, 0 or more, for argparse (its error says "invalid count value")."""
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


def _add_top(commands: Any) -> None:
    top = commands.add_parser("top", help="live view: services, tasks, CPU, memory, GPUs")
    _common(top)
    top.add_argument("--once", action="store_true", help="print one frame and exit")
    top.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    top.set_defaults(func=cmd_top)


def _add_plugins(commands: Any) -> None:
    plugins = commands.add_parser(
        "plugins",
        help="installed plugins: list, info NAME, enable NAME, disable NAME, commands, "
        "run NAME COMMAND [ARGS...]",
        description="`run NAME COMMAND [ARGS...]` runs a command a plugin registered, inside "
        "the plugin's host, and prints what it returns. Arguments that start with '-' go "
        "after `--` (`llmos plugins run faq reindex -- --full`): before it they are read as "
        "options of llmos itself.",
    )
    plugins.add_argument("action", choices=["list", "info", "enable", "disable", "commands", "run"])
    plugins.add_argument("name", nargs="?", help="the plugin (not for list and commands)")
    plugins.add_argument("rest", nargs="*", help="run: the command, then its arguments")
    _common(plugins)
    plugins.set_defaults(func=cmd_plugins)


def _add_operator_views(commands: Any) -> None:
    """`llmos top` and `llmos plugins`: what runs, and switching plugins on and off."""
    _add_top(commands)
    _add_plugins(commands)


def build_parser() -> argparse.ArgumentParser:  # noqa: PLR0915 - a few statements a command
    parser = argparse.ArgumentParser(prog="llmos", description="LLM OS command line")
    parser.add_argument("--version", action="version", version=f"llmos {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="start the whole stack as local processes")
    _common(up, runs_processes=True)
    up.add_argument("--model", help="default model: a catalogue name or a model directory")
    up.set_defaults(func=cmd_up)

    serve = commands.add_parser("serve", help="run one process of the stack in the foreground")
    serve.add_argument(
        "name", choices=["kernel", "runtime", "safety", "privacy", "explain", "hardware"]
    )
    _common(serve, runs_processes=True)
    serve.add_argument("--model")
    serve.set_defaults(func=cmd_serve)

    prepare = commands.add_parser("prepare-model", help="convert the default model once")
    _common(prepare, runs_processes=True)
    prepare.add_argument("--model")
    prepare.set_defaults(func=cmd_prepare_model)

    status = commands.add_parser(
        "status", help="each service, its address, pid, health and metrics address"
    )
    _common(status)
    status.add_argument("--json", action="store_true", help="one JSON object")
    status.set_defaults(func=cmd_status)

    generate = commands.add_parser("generate", help="stream a completion to stdout")
    generate.add_argument("prompt")
    _client(generate)
    generate.add_argument("--usage", action="store_true", help="print token counts to stderr")
    generate.set_defaults(func=cmd_generate)

    chat = commands.add_parser("chat", help="interactive conversation")
    _client(chat)
    chat.add_argument("--system", help="system prompt")
    chat.set_defaults(func=cmd_chat)

    submit = commands.add_parser("submit", help="queue a task; prints its id at once")
    submit.add_argument("prompt")
    _client(submit)
    submit.add_argument("--priority", choices=sorted(PRIORITIES), default="normal")
    submit.set_defaults(func=cmd_submit)

    tasks = commands.add_parser("tasks", help="list tasks, newest first")
    _common(tasks)
    tasks.add_argument("--tenant", help="only this tenant's tasks")
    tasks.add_argument(
        "--state",
        choices=[n.lower() for n in STATE_NAMES.values() if n != "UNSPECIFIED"],
        help="only tasks in this state",
    )
    tasks.add_argument(
        "--limit", type=count, default=20, help="show at most N tasks; 0 shows all (20)"
    )
    tasks.set_defaults(func=cmd_tasks)

    trace = commands.add_parser("trace", help="a task's trace as a tree")
    trace.add_argument("task_id")
    _common(trace)
    trace.set_defaults(func=cmd_trace)

    _add_operator_views(commands)

    from llmos.kernel.privacy_cli import add_commands as add_privacy_commands

    add_privacy_commands(commands, _common, _settings)

    from llmos.kernel.safety_cli import add_commands as add_safety_commands

    add_safety_commands(commands, _common, _settings)

    from llmos.kernel.forget_cli import add_commands as add_forget_commands

    add_forget_commands(commands, _common, _settings)
    from llmos.kernel.keys_cli import add_commands as add_keys_commands

    add_keys_commands(commands, _common, _settings)

    from llmos.kernel.model_cli import add_commands as add_model_commands

    add_model_commands(commands, _common, _settings)

    probe = commands.add_parser("probe", help="grpc.health.v1 check, for container health checks")
    probe.add_argument("address")
    probe.add_argument("--service", default="")
    probe.add_argument("--timeout", type=float, default=3.0)
    probe.set_defaults(func=cmd_probe)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result: Any = args.func(args)
    except LlmosError as error:
        print(f"llmos: {error.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return int(result)


if __name__ == "__main__":
    sys.exit(main())
