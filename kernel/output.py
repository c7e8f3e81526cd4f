"""The runtime's stream on its way to the client: safety:output, then privacy:restore.

The two after-model service stages work on the stream as it flows rather than on the whole
output at its end, so a harmful output is stopped mid-way and the client reads restored
text as it is generated. `OutputPath.feed` takes each runtime piece and returns the pieces
the client may see now, in order:

1. safety:output — one CheckStream call (kernel/safety.py `OutputGuard`); a piece is let
   through only once the service has checked the text up to its end, so no unchecked text
   reaches the client. When a verdict blocks, `blocked` is true: the caller stops the
   runtime and ends the stream with `refused(...)`, finish reason SAFETY. The guard reads
   the model's raw output, placeholders and all: the safety service never sees the PII
   that privacy:redact took out.
2. privacy:restore — one RestoreStream call (kernel/privacy.py `OutputRestorer`) when the
   request was pseudonymized and something was found (`restore`); its text replaces the
   piece's, and a placeholder split across pieces comes back whole in a later one.

The failure rule is the pipeline's (kernel/stages.py `fail`): a service that is down when
the stream starts, or goes down during it, refuses the task with UNAVAILABLE (fail closed)
unless the policy makes the stage fail-open; then the stage is traced "failed_open" and
the stream goes on without it (what the guard held is let through unchecked, by policy).
`steps()` are the two stages' trace steps, with the verdict and its evidence.
"""

from __future__ import annotations

import collections
import time

from llmos.kernel.policy import TenantPolicy
from llmos.kernel.privacy import OutputRestorer
from llmos.kernel.registry import Registry
from llmos.kernel.safety import OutputGuard, refusal, verdict_step
from llmos.kernel.stages import PRIVACY_OFF, fail, skipped_step
from llmos.services.errors import DeadlineExceeded, Unavailable
from llmos.services.timing import now_timestamp, since
from llmos.v1 import common_pb2, runtime_pb2

Piece = runtime_pb2.RuntimeServiceGenerateResponse
SAFETY, RESTORE = "safety:output", "privacy:restore"
# A service failing this way is down (the stage's failure policy decides); any other error
# is a real answer and fails the task.
DOWN = (Unavailable, DeadlineExceeded)


class OutputPath:
    """safety:output and privacy:restore for one task's stream, as its policy chooses."""

    def __init__(
        self,
        registry: Registry,
        policy: TenantPolicy,
        *,
        task_id: str,
        tenant: str,
        deadline: float | None,
        restore: bool,
    ) -> None:
        """Open the calls; raise Unavailable when a fail-closed stage's service is down.
        `restore`: the request was pseudonymized, so the output may hold placeholders."""
        self._policy = policy
        self._clock = time.monotonic()
        self._guard: OutputGuard[Piece] | None = None
        self._restorer: OutputRestorer | None = None
        self._steps: dict[str, common_pb2.TraceStep] = {}
        # Pieces fed and not yet let through, each marked whether the guard holds it.
        self._held: collections.deque[tuple[Piece, bool]] = collections.deque()
        self._restored = 0
        timeout = None if deadline is None else max(0.001, deadline - time.monotonic())
        if SAFETY in policy.stages:
            step = self._step(SAFETY)
            try:
                entry = registry.pick(common_pb2.SERVICE_KIND_SAFETY)
                step.service = entry.info.name
                self._guard = OutputGuard(entry.channel, tenant, timeout)
            except Unavailable as error:
                self._fail(SAFETY, error.message)
        if RESTORE in policy.stages:
            if policy.privacy == "off":
                self._steps[RESTORE] = skipped_step(RESTORE, policy.name, PRIVACY_OFF)
            elif not restore:
                self._steps[RESTORE] = skipped_step(
                    RESTORE,
                    policy.name,
                    "nothing to restore: privacy:redact put no placeholder in the request"
                    if policy.privacy == "pseudonymize"
                    else f"privacy {policy.privacy} is irreversible: nothing to restore",
                )
            else:
                step = self._step(RESTORE)
                try:
                    entry = registry.pick(common_pb2.SERVICE_KIND_PRIVACY)
                    step.service = entry.info.name
                    self._restorer = OutputRestorer(
                        entry.channel, tenant=tenant, conversation=task_id
                    )
                except Unavailable as error:
                    self._fail(RESTORE, error.message)

    @property
    def blocked(self) -> bool:
        return self._guard is not None and self._guard.blocked

    async def feed(self, piece: Piece) -> list[Piece]:
        """A runtime piece in; the pieces the client may see now out (none once blocked)."""
        if self._guard is None or not piece.text:
            # Nothing to check: it follows whatever the guard still holds.
            self._held.append((piece, False))
            return await self._restore(self._release(0))
        self._held.append((piece, True))
        try:
            checked = await self._guard.feed(piece.text, piece)
        except DOWN as error:
            self._guard_failed(error.message)
            return await self._restore(self._release(len(self._held)))
        return await self._restore(self._release(len(checked)))

    async def close(self) -> list[Piece]:
        """The runtime's stream ended: check and restore the rest."""
        released: list[Piece] = []
        if self._guard is not None:
            try:
                released = self._release(len(await self._guard.close()))
            except DOWN as error:
                self._guard_failed(error.message)
        if not self.blocked:
            released += self._release(len(self._held))
        out = await self._restore(released)
        if self._restorer is not None:
            try:
                rest = await self._restorer.close()
            except DOWN as error:
                self._restorer_failed(error.message)
                rest = ""
            if rest:  # the last piece carries what the restorer held back
                if not out:
                    out.append(Piece())
                out[-1].text += rest
        return out

    def refused(self, last: Piece) -> Piece:
        """The stream's last piece once safety:output blocked it: the refusal, naming
        the category, with finish reason SAFETY (`last` is the runtime's last piece)."""
        assert self._guard is not None
        piece = Piece(
            text=refusal(self._guard.verdict),
            finish_reason=common_pb2.FINISH_REASON_SAFETY,
            model=last.model,
        )
        if last.HasField("usage"):
            piece.usage.CopyFrom(last.usage)
        return piece

    def cancel(self) -> None:
        """Stop both calls (a no-op on a finished one): the task ended early."""
        if self._guard is not None:
            self._guard.cancel()
        if self._restorer is not None:
            self._restorer.cancel()

    def steps(self) -> list[common_pb2.TraceStep]:
        """The trace steps of the stages that ran, in pipeline order, with the verdict."""
        elapsed = since(self._clock)
        if self._guard is not None:
            step = self._steps[SAFETY]
            verdict = verdict_step(SAFETY, step.service, self._guard.verdict, self._policy.name)
            verdict.started_at.CopyFrom(step.started_at)
            step.CopyFrom(verdict)
        if self._restorer is not None:
            step = self._steps[RESTORE]
            step.decision = "restored"
            step.reason = "placeholders put back in the output before the client saw it"
            step.evidence["pieces"] = str(self._restorer.pieces)
        for step in self._steps.values():
            if step.decision != "skipped":
                step.duration.CopyFrom(elapsed)
        return [self._steps[name] for name in (SAFETY, RESTORE) if name in self._steps]

    # -- inside -----------------------------------------------------------------------

    def _step(self, name: str) -> common_pb2.TraceStep:
        step = common_pb2.TraceStep(stage=name, started_at=now_timestamp())
        step.evidence["policy"] = self._policy.name
        self._steps[name] = step
        return step

    def _fail(self, name: str, why: str) -> None:
        """`name`'s service is down: raise (fail closed) or trace it "failed_open"."""
        fail(name, self._policy.name, name in self._policy.fail_open, self._steps[name], why)

    def _guard_failed(self, why: str) -> None:
        assert self._guard is not None
        self._guard.cancel()
        self._guard = None
        self._fail(SAFETY, why)

    def _restorer_failed(self, why: str) -> None:
        assert self._restorer is not None
        self._restorer.cancel()
        self._restorer = None
        self._fail(RESTORE, why)

    def _release(self, checked: int) -> list[Piece]:
        """Take the first `checked` guarded pieces off the front, with the unguarded ones
        between and after them: everything before them has been let through."""
        out: list[Piece] = []
        while self._held and (checked > 0 or not self._held[0][1]):
            piece, guarded = self._held.popleft()
            checked -= guarded
            out.append(piece)
        return out

    async def _restore(self, pieces: list[Piece]) -> list[Piece]:
        """The pieces with their text restored (a copy; the runtime's pieces stay raw)."""
        if self._restorer is None:
            return pieces
        out = []
        for piece in pieces:
            restored = Piece()
            restored.CopyFrom(piece)
            if piece.text and self._restorer is not None:
                try:
                    restored.text = await self._restorer.feed(piece.text)
                except DOWN as error:
                    self._restorer_failed(error.message)
            out.append(restored)
        return out
