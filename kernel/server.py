"""KernelService: the clients' only entry point; it turns requests into tasks and keeps the
registry of services.

Generate and Submit both go through the task runner (kernel/tasks.py): validation here,
then admission by the scheduler, the request pipeline, the runtime, and the task store.
The client's deadline bounds the task (and so every downstream call); a Generate client
that disconnects cancels its task, which cancels the runtime call and frees its slot.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

import grpc

from llmos.kernel import key_rotation
from llmos.kernel.forget import Forgetter
from llmos.kernel.memory import Headroom
from llmos.kernel.model_calls import MODEL_CALLS, ModelCalls
from llmos.kernel.plugins import PluginHosts
from llmos.kernel.policy import Policies
from llmos.kernel.registry import Registry
from llmos.kernel.retention import RetentionSweeper
from llmos.kernel.safety import relay_policy
from llmos.kernel.scheduler import DEFAULT_QUEUE_LIMITS, Priority, Scheduler, SchedulerConfig
from llmos.kernel.store import SqliteTaskStore, TaskRecord, TaskStore
from llmos.kernel.store.redis import RedisTaskStore
from llmos.kernel.store.work_queue import RedisWorkQueue
from llmos.kernel.tasks import TaskRunner
from llmos.services.channels import TENANT_KEY, outgoing_metadata
from llmos.services.config import Settings
from llmos.services.errors import (
    InvalidArgument,
    LlmosError,
    NotFound,
    Unavailable,
    from_rpc_error,
)
from llmos.services.keyring import load_keys
from llmos.services.rpc_types import Context
from llmos.services.validation import chat_messages, sampling_from
from llmos.v1 import common_pb2, kernel_pb2, kernel_pb2_grpc, runtime_pb2, runtime_pb2_grpc

log = logging.getLogger(__name__)

DEFAULT_TENANT = "default"


def tenant_of(context: Context) -> str:
    """The calling tenant, from call metadata (authentication arrives with the policy work)."""
    for key, value in context.invocation_metadata() or ():
        if key == TENANT_KEY and value:
            return str(value)
    return DEFAULT_TENANT


def task_proto(record: TaskRecord) -> kernel_pb2.Task:
    task = kernel_pb2.Task(
        task_id=record.task_id,
        tenant=record.tenant,
        state=record.state,
        model=record.model,
        finish_reason=record.finish_reason,
        error=record.error,
    )
    task.created_at.FromNanoseconds(int(record.created_at * 1e9))
    if record.finished_at is not None:
        task.finished_at.FromNanoseconds(int(record.finished_at * 1e9))
    if record.usage:
        task.usage.ParseFromString(record.usage)
    return task


class KernelServicer(kernel_pb2_grpc.KernelServiceServicer):
    def __init__(self, settings: Settings, registry: Registry, service: KernelService) -> None:
        self.settings = settings
        self.registry = registry
        self.service = service

    @property
    def runner(self) -> TaskRunner:
        if self.service.runner is None:
            raise Unavailable("the kernel is still starting", reason="NOT_READY")
        return self.service.runner

    def _validate(self, request: kernel_pb2.GenerateRequest) -> None:
        """Refuse bad input here, before anything is queued or stored."""
        chat_messages(request.prompt, request.messages, self.settings.max_prompt_chars)
        sampling_from(request.sampling, self.settings.default_max_tokens)

    def Generate(
        self, request: kernel_pb2.GenerateRequest, context: Context
    ) -> AsyncIterator[kernel_pb2.GenerateResponse]:
        """The runner's stream itself, not a generator wrapping it: one async-generator
        layer fewer for every message (bad input is refused here, before it starts)."""
        self._validate(request)
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        return self.runner.stream(request, tenant_of(context), deadline)

    async def Submit(
        self, request: kernel_pb2.SubmitRequest, context: Context
    ) -> kernel_pb2.SubmitResponse:
        self._validate(request.request)
        task_id = await self.runner.submit(request.request, tenant_of(context))
        return kernel_pb2.SubmitResponse(task_id=task_id)

    async def GetTask(
        self, request: kernel_pb2.GetTaskRequest, context: Context
    ) -> kernel_pb2.GetTaskResponse:
        record = await self.runner.store.get(request.task_id)
        return kernel_pb2.GetTaskResponse(task=task_proto(record), output=record.output)

    async def WatchTask(
        self, request: kernel_pb2.WatchTaskRequest, context: Context
    ) -> AsyncIterator[kernel_pb2.WatchTaskResponse]:
        async for event in self.runner.watch(request.task_id, request.offset):
            yield event

    async def ListTasks(
        self, request: kernel_pb2.ListTasksRequest, context: Context
    ) -> kernel_pb2.ListTasksResponse:
        records, next_token = await self.runner.store.list(
            tenant=request.tenant or None,
            state=request.state or None,
            page_size=request.page_size or 50,
            page_token=request.page_token,
        )
        return kernel_pb2.ListTasksResponse(
            tasks=[task_proto(r) for r in records], next_page_token=next_token
        )

    async def CancelTask(
        self, request: kernel_pb2.CancelTaskRequest, context: Context
    ) -> kernel_pb2.CancelTaskResponse:
        record = await self.runner.cancel(request.task_id)
        return kernel_pb2.CancelTaskResponse(state=record.state)

    async def GetTrace(
        self, request: kernel_pb2.GetTraceRequest, context: Context
    ) -> kernel_pb2.GetTraceResponse:
        await self.runner.store.get(request.task_id)  # NOT_FOUND for an unknown id
        steps = [
            common_pb2.TraceStep.FromString(raw)
            for raw in await self.runner.store.trace(request.task_id)
        ]
        return kernel_pb2.GetTraceResponse(task_id=request.task_id, steps=steps)

    async def ListModels(
        self, request: kernel_pb2.ListModelsRequest, context: Context
    ) -> kernel_pb2.ListModelsResponse:
        runtime = self.registry.pick(common_pb2.SERVICE_KIND_RUNTIME)
        stub = runtime_pb2_grpc.RuntimeServiceStub(runtime.channel)
        try:
            reply = await stub.ListModels(
                runtime_pb2.RuntimeServiceListModelsRequest(),
                timeout=context.time_remaining(),
                metadata=outgoing_metadata(),
            )
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(
                error, f"ListModels on {runtime.info.name} at {runtime.info.address}"
            ) from error
        return kernel_pb2.ListModelsResponse(models=reply.models)

    async def RegisterService(
        self, request: kernel_pb2.RegisterServiceRequest, context: Context
    ) -> kernel_pb2.RegisterServiceResponse:
        lease = await self.registry.register(request)
        return kernel_pb2.RegisterServiceResponse(lease_seconds=lease)

    async def DeregisterService(
        self, request: kernel_pb2.DeregisterServiceRequest, context: Context
    ) -> kernel_pb2.DeregisterServiceResponse:
        await self.registry.deregister(request.name)
        return kernel_pb2.DeregisterServiceResponse()

    # -- runtimeapi: Score and Embed (kernel/model_calls.py) ------------------------------

    async def Score(
        self, request: kernel_pb2.ScoreRequest, context: Context
    ) -> kernel_pb2.ScoreResponse:
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        return await self.service.model_calls.score(request, tenant_of(context), deadline)

    async def Embed(
        self, request: kernel_pb2.EmbedRequest, context: Context
    ) -> kernel_pb2.EmbedResponse:
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        return await self.service.model_calls.embed(request, tenant_of(context), deadline)

    async def ListServices(
        self, request: kernel_pb2.ListServicesRequest, context: Context
    ) -> kernel_pb2.ListServicesResponse:
        return kernel_pb2.ListServicesResponse(services=self.registry.services())

    # -- plugins and tools (kernel/plugins.py) ------------------------------------------

    async def ListPlugins(
        self, request: kernel_pb2.ListPluginsRequest, context: Context
    ) -> kernel_pb2.ListPluginsResponse:
        plugins = self.service.plugins
        return kernel_pb2.ListPluginsResponse(plugins=[plugins.info(p) for p in plugins.plugins])

    async def GetPlugin(
        self, request: kernel_pb2.GetPluginRequest, context: Context
    ) -> kernel_pb2.GetPluginResponse:
        plugins = self.service.plugins
        return kernel_pb2.GetPluginResponse(plugin=plugins.info(plugins.find(request.name)))

    async def EnablePlugin(
        self, request: kernel_pb2.EnablePluginRequest, context: Context
    ) -> kernel_pb2.EnablePluginResponse:
        plugins = self.service.plugins
        return kernel_pb2.EnablePluginResponse(
            plugin=plugins.info(await plugins.enable(request.name))
        )

    async def DisablePlugin(
        self, request: kernel_pb2.DisablePluginRequest, context: Context
    ) -> kernel_pb2.DisablePluginResponse:
        plugins = self.service.plugins
        return kernel_pb2.DisablePluginResponse(
            plugin=plugins.info(await plugins.disable(request.name))
        )

    async def ListPluginCommands(
        self, request: kernel_pb2.ListPluginCommandsRequest, context: Context
    ) -> kernel_pb2.ListPluginCommandsResponse:
        return kernel_pb2.ListPluginCommandsResponse(commands=self.service.plugins.list_commands())

    async def RunPluginCommand(
        self, request: kernel_pb2.RunPluginCommandRequest, context: Context
    ) -> kernel_pb2.RunPluginCommandResponse:
        output = await self.service.plugins.run_command(
            request.plugin, request.command, list(request.args)
        )
        log.info("plugin command %s %s run", request.plugin, request.command)
        return kernel_pb2.RunPluginCommandResponse(output=output)

    async def ListTools(
        self, request: kernel_pb2.ListToolsRequest, context: Context
    ) -> kernel_pb2.ListToolsResponse:
        return kernel_pb2.ListToolsResponse(tools=self.service.plugins.list_tools())

    async def InvokeTool(
        self, request: kernel_pb2.InvokeToolRequest, context: Context
    ) -> kernel_pb2.InvokeToolResponse:
        """Run a tool; with a task id (of the caller's tenant) the call joins its trace,
        whether it succeeds or not."""
        tenant = tenant_of(context)
        if request.task_id:
            record = await self.runner.store.get(request.task_id)
            if record.tenant != tenant:  # another tenant's task: as good as unknown
                raise NotFound(f"no task {request.task_id}", reason="TASK_NOT_FOUND")
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        try:
            output, step = await self.service.plugins.invoke_tool(
                tenant, request.name, request.input, deadline
            )
        except LlmosError as error:
            log.info("tool %s refused for %s: %s", request.name, tenant, error.message)
            if request.task_id:
                failed = common_pb2.TraceStep(
                    stage="tool", service="kernel", decision="refused", reason=error.message
                )
                failed.evidence.update({"tool": request.name, "tenant": tenant})
                failed.started_at.GetCurrentTime()
                await self.runner.store.add_trace_step(request.task_id, failed.SerializeToString())
            raise
        log.info("tool %s invoked by %s", request.name, tenant)
        if request.task_id:
            await self.runner.store.add_trace_step(request.task_id, step.SerializeToString())
        return kernel_pb2.InvokeToolResponse(output=output)

    # -- safety admin, relayed to the safety service (kernel/safety.py) ------------------

    async def GetSafetyPolicy(
        self, request: kernel_pb2.GetSafetyPolicyRequest, context: Context
    ) -> kernel_pb2.GetSafetyPolicyResponse:
        policy = await relay_policy(self.registry, request, context.time_remaining())
        return kernel_pb2.GetSafetyPolicyResponse(policy=policy)

    async def SetSafetyPolicy(
        self, request: kernel_pb2.SetSafetyPolicyRequest, context: Context
    ) -> kernel_pb2.SetSafetyPolicyResponse:
        policy = await relay_policy(self.registry, request, context.time_remaining())
        log.info("safety policy %s set through the kernel", policy.version)
        return kernel_pb2.SetSafetyPolicyResponse(policy=policy)

    # -- forget (kernel/forget.py): admin ---------------------------------------------

    async def ForgetTenant(
        self, request: kernel_pb2.ForgetTenantRequest, context: Context
    ) -> kernel_pb2.ForgetTenantResponse:
        return await Forgetter(self.runner, self.registry).forget_tenant(request.tenant)

    async def ForgetSubject(
        self, request: kernel_pb2.ForgetSubjectRequest, context: Context
    ) -> kernel_pb2.ForgetSubjectResponse:
        forgetter = Forgetter(self.runner, self.registry)
        return await forgetter.forget_subject(request.tenant, request.subject)

    async def RotateKeys(
        self, request: kernel_pb2.RotateKeysRequest, context: Context
    ) -> kernel_pb2.RotateKeysResponse:
        return await key_rotation.rotate(self.service.keys)

    async def GetKeyStatus(
        self, request: kernel_pb2.GetKeyStatusRequest, context: Context
    ) -> kernel_pb2.GetKeyStatusResponse:
        return await key_rotation.status(
            self.service.keys, self.runner.store, self.service.rewrapper
        )


def _queue_limits(settings: Settings) -> dict[Priority, int]:
    """Tickets queued per priority class before refusing: kernel_max_queued, or defaults."""
    if settings.kernel_max_queued > 0:
        return dict.fromkeys(Priority, settings.kernel_max_queued)
    return dict(DEFAULT_QUEUE_LIMITS)


class KernelService:
    """The kernel process: ready once its task store is open and recovered."""

    kind = common_pb2.SERVICE_KIND_KERNEL

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Checked before anything starts: a misspelt stage must stop the kernel, not be
        # silently skipped for every request.
        self.policies = Policies.from_settings(settings)
        self.registry = Registry(settings.lease_s, settings.max_message_bytes)
        # The host's free memory, followed through the hardware service; new work is
        # refused below kernel_min_free_mb (kernel/memory.py).
        self.headroom = Headroom(self.registry, settings.kernel_min_free_mb * 2**20)
        self.servicer = KernelServicer(settings, self.registry, self)
        # Score and Embed: admitted by their own scheduler, at most this many at a time.
        self.model_calls = ModelCalls(
            self.registry,
            self.headroom,
            SchedulerConfig(
                aging_s=settings.kernel_aging_s,
                service_limits={MODEL_CALLS: settings.kernel_model_call_concurrency},
                queue_limits=_queue_limits(settings),
            ),
        )
        self.store: TaskStore | None = None
        self.runner: TaskRunner | None = None
        self.retention: RetentionSweeper | None = None
        # The at-rest keys (services/keyring.py), shared with the privacy service; loaded
        # here so a key file others can read stops the kernel before it serves.
        self.keys = load_keys(settings.privacy_key, settings.privacy_key_file, settings.data_dir)
        self.rewrapper: key_rotation.Rewrapper | None = None
        # Reads the plugin list now (manifests only, no plugin code); hosts start in start().
        self.plugins = PluginHosts(settings, self.registry)

    def add_to_server(self, server: grpc.aio.Server) -> list[str]:
        kernel_pb2_grpc.add_KernelServiceServicer_to_server(self.servicer, server)
        return [kernel_pb2.DESCRIPTOR.services_by_name["KernelService"].full_name]

    async def start(self) -> None:
        self.registry.start()
        self.headroom.start()
        limits = _queue_limits(self.settings)
        queue: RedisWorkQueue | None = None
        if self.settings.task_store == "redis":
            store = await RedisTaskStore.open(
                self.settings.redis_url,
                prefix=self.settings.redis_prefix,
                keys=self.keys,
                retry_s=self.settings.redis_retry_s,
            )
            queue = RedisWorkQueue(
                store,
                claim_idle_s=self.settings.kernel_claim_idle_s,
                max_deliveries=self.settings.kernel_max_deliveries,
                queue_limits=limits,
            )
            self.store = store
        elif self.settings.task_store == "sqlite":
            self.store = await SqliteTaskStore.open(self.settings.data_dir, keys=self.keys)
        else:
            raise InvalidArgument(
                f'task_store is {self.settings.task_store!r}; use "sqlite" (one kernel, '
                'embedded) or "redis" (several kernels, with redis_url)',
                reason="BAD_SETTING",
            )
        concurrency = self.settings.kernel_runtime_concurrency
        scheduler = Scheduler(
            SchedulerConfig(
                aging_s=self.settings.kernel_aging_s,
                service_limits={"runtime": concurrency},
                queue_limits=limits,
            )
        )
        # With a shared queue, hold a quarter more than can run, so a freed slot is filled
        # from this kernel's own queue without a round trip to Redis.
        self.runner = TaskRunner(
            self.registry,
            self.store,
            scheduler,
            queue,
            max_local=concurrency + max(1, concurrency // 4),
            policies=self.policies,
            plugins=self.plugins,
            headroom=self.headroom,
        )
        for policy in self.policies.all():
            if policy.unchecked:
                log.warning(
                    "pipeline policy %s leaves out %s: its requests are not checked there",
                    policy.describe(),
                    ", ".join(policy.unchecked),
                )
            else:
                log.info("pipeline policy %s", policy.describe())
        await self.plugins.start()
        await self.runner.start()
        self.retention = RetentionSweeper(
            self.store,
            self.policies,
            interval_s=self.settings.kernel_retention_sweep_s,
            batch=self.settings.kernel_retention_batch,
        )
        self.retention.start()
        self.rewrapper = key_rotation.Rewrapper(
            self.store, self.keys, self.settings.key_rewrap_rate
        )
        self.rewrapper.start()
        log.info("task store sealed with key %s (%s)", self.keys.active, self.keys.source)
        if queue is not None:
            log.info("sharing work through %s as kernel %s", store.where, queue.kernel_id)

    async def stop(self) -> None:
        if self.retention is not None:
            await self.retention.close()
        if self.rewrapper is not None:
            await self.rewrapper.close()
        if self.runner is not None:
            await self.runner.close()
        await self.plugins.close()
        if self.store is not None:
            await self.store.close()
        await self.headroom.close()
        await self.registry.close()
