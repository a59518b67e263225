"""One output line's answer (a response, or an error status) as what the online path would
make of the same answer from Gemini: a Verdict to write, or the result that leaves the
image for the next run."""

from __future__ import annotations

from captioner.batch_jobs.index import Admitted
from captioner.batch_jobs.outputs import LineRefused, OutputLine
from captioner.batch_jobs.ports import ReadAnswer, ReadStatus
from captioner.captions import CaptionSpec, InvalidAnswerError, with_captions
from captioner.domain import CaptionResult, Description, ObjectRef, Outcome
from captioner.errors import PermanentError, TransientError
from captioner.metadata import MetadataKeys
from captioner.recording import Verdict, result_for, verdict

# Answers that the online path asks for a second time (cut at the output cap, empty, off
# the schema). A batch has no second time, so they are left to the next run, where the
# online path gets its second chance, rather than recorded as final.
_SECOND_CHANCE = "left for the next run, which asks again with the online path's second chance"


def answer_of(
    line: OutputLine,
    admitted: Admitted,
    keys: MetadataKeys,
    model: str,
    read_answer: ReadAnswer,
    read_status: ReadStatus,
) -> Verdict | CaptionResult:
    """The Verdict to write, or the CaptionResult that ends this line unwritten.
    Whatever the answer's bytes make the readers raise is the line's fault (refused)."""
    try:
        return _read(line, admitted, keys, model, read_answer, read_status)
    except (PermanentError, TransientError):
        raise
    except Exception as exc:
        raise LineRefused("unreadable-answer", f"{type(exc).__name__}: {exc!s:.200}") from None


def _read(
    line: OutputLine,
    admitted: Admitted,
    keys: MetadataKeys,
    model: str,
    read_answer: ReadAnswer,
    read_status: ReadStatus,
) -> Verdict | CaptionResult:
    ref, spec = admitted.key.ref, admitted.spec
    if line.response is None:
        error = read_status(line.status) if line.status else None
        if isinstance(error, PermanentError):
            return verdict(keys, spec, error=error)
        message = str(error) if error else "no answer for this request"
        reason = getattr(error, "reason", "missing") if error else "missing"
        return result_for(ref, Outcome.RETRY, reason=reason, message=message)
    try:
        description = read_answer(line.response, model)
    except PermanentError as exc:
        return verdict(keys, spec, error=exc)
    except TransientError as exc:
        return result_for(ref, Outcome.RETRY, reason=exc.reason, message=str(exc))
    if description.blocked_reason is not None:
        return verdict(keys, spec, description=description)
    return _checked(ref, spec, keys, description)


def _checked(
    ref: ObjectRef, spec: CaptionSpec, keys: MetadataKeys, description: Description
) -> Verdict | CaptionResult:
    if description.cut_off:
        return result_for(ref, Outcome.RETRY, reason="max-tokens", message=_SECOND_CHANCE)
    if not description.text or not description.text.strip():
        return result_for(ref, Outcome.RETRY, reason="empty-answer", message=_SECOND_CHANCE)
    try:
        captions = spec.parse(description.text)
    except InvalidAnswerError as exc:
        return result_for(
            ref, Outcome.RETRY, reason="invalid-answer", message=f"{exc}; {_SECOND_CHANCE}"
        )
    return verdict(keys, spec, description=with_captions(description, captions))
