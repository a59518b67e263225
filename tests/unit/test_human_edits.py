"""A person's caption wins: the decision, the write rules and the pipeline, in memory."""

from __future__ import annotations

from functools import partial

import pytest

from captioner.adapters.images import prepare
from captioner.captions import CaptionSpec
from captioner.decisions import Skip, Wanted, decide
from captioner.domain import Description, ObjectInfo, ObjectRef, Outcome
from captioner.errors import BadRequestError
from captioner.metadata import (
    TOTAL_BUDGET,
    MetadataKeys,
    NoRoomError,
    Review,
    caption_updates,
    is_human,
)
from captioner.pipeline import Captioner, PipelineConfig
from captioner.readback import as_json, as_text, record_of
from captioner.recording import Recorder
from captioner.reviewing import Change, human_verdict, kept_verdict, reviewer, split_tags
from captioner.rules import RuleBook
from tests import images
from tests.fakes import MemoryStorage, ScriptedDescriber

B = "bucket"
KEYS = MetadataKeys()
RULES = RuleBook(CaptionSpec("Describe.", structured=False))


def captioned(generation: int = 7, **extra: str) -> dict[str, str]:
    return {
        "caption": "A cat.",
        "caption-status": "ok",
        "caption-model": "old-model",
        "caption-generation": str(generation),
        "caption-created": "2025-01-01T00:00:00Z",
        "caption-prompt": "old-prompt",
        "caption-alt": "A cat",
        "caption-tags": "cat,sofa",
        **extra,
    }


def info(metadata: dict[str, str], generation: int = 7) -> ObjectInfo:
    return ObjectInfo(B, "a/cat.jpg", generation, 3, "image/jpeg", 100, metadata)


HUMAN = {"caption-source": "human", "caption-reviewed-by": "ana"}
APPROVED = {"caption-source": "approved", "caption-reviewed-by": "ana"}


@pytest.mark.parametrize("marks", [HUMAN, APPROVED], ids=["edited", "approved"])
@pytest.mark.parametrize(
    "flags",
    [{}, {"overwrite": True}, {"if_stale": True}, {"overwrite": True, "if_stale": True}],
    ids=["plain", "overwrite", "if-stale", "both"],
)
def test_a_persons_caption_is_skipped_as_human_by_every_automatic_path(
    marks: dict[str, str], flags: dict[str, bool]
) -> None:
    decision = decide(info(captioned(**marks)), keys=KEYS, rules=RULES, model="new", **flags)
    assert isinstance(decision, Skip)
    assert decision.reason == "human"
    assert "ana" in (decision.message or "")


def test_include_human_with_overwrite_captions_it_again() -> None:
    meta = captioned(**HUMAN)
    wanted = decide(info(meta), keys=KEYS, rules=RULES, model="m", overwrite=True,
                    include_human=True)  # fmt: skip
    assert isinstance(wanted, Wanted)
    # Without overwrite, include_human alone finds it done, as any caption.
    plain = decide(info(meta), keys=KEYS, rules=RULES, model="m", include_human=True)
    assert isinstance(plain, Skip)
    assert plain.reason == "already-captioned"


def test_a_new_upload_is_a_new_image_whatever_the_person_said_of_the_old_one() -> None:
    old = captioned(generation=7, **HUMAN)
    assert not is_human(old, 8, KEYS)
    assert isinstance(decide(info(old, generation=8), keys=KEYS, rules=RULES, model="m"), Wanted)


def test_a_model_write_clears_the_marks_of_a_review_it_replaces() -> None:
    updates = caption_updates(
        existing=captioned(**HUMAN, **{"caption-reviewed": "x"}),
        keys=KEYS, generation=7, status="ok", model="m", texts={"caption": "New."},
    )  # fmt: skip
    assert updates["caption-source"] == updates["caption-reviewed-by"] == ""
    assert updates["caption-reviewed"] == ""


def test_a_persons_words_are_written_whole_or_not_at_all() -> None:
    owner = {"notes": "x" * 7000}
    long = {"caption": "word " * 300}
    with pytest.raises(NoRoomError, match="shorten"):
        caption_updates(
            existing=owner, keys=KEYS, generation=1, status="ok", model="", texts=long,
            review=Review("human", "ana"),
        )  # fmt: skip
    # The model's words in the same place are cut to fit, as before.
    cut = caption_updates(
        existing=owner, keys=KEYS, generation=1, status="ok", model="m", texts=long
    )
    assert cut["caption"].endswith("…")
    assert sum(len(k) + len(v) for k, v in {**owner, **cut}.items()) <= TOTAL_BUDGET


def test_an_edit_keeps_what_it_does_not_change_and_drops_translations_of_old_words() -> None:
    keys = MetadataKeys("caption", ("en", "de"))
    meta = captioned(**{"caption-de": "Eine Katze."})
    said = human_verdict(info(meta), keys, Change(caption="  Miso, our cat\n"), "ana")
    assert said.texts == {"caption": "Miso, our cat", "caption-alt": "A cat",
                          "caption-tags": "cat,sofa"}  # fmt: skip
    assert said.review == Review("human", "ana")
    assert said.model == "old-model"  # the caption the person started from
    alt_only = human_verdict(info(meta), keys, Change(alt=""), "ana")
    assert alt_only.texts == {"caption": "A cat.", "caption-tags": "cat,sofa",
                              "caption-de": "Eine Katze."}  # fmt: skip


def test_an_edit_of_an_image_captioned_for_an_older_upload_keeps_none_of_those_words() -> None:
    said = human_verdict(info(captioned(generation=6)), KEYS, Change(caption="New."), "ana")
    assert said.texts == {"caption": "New."}
    with pytest.raises(BadRequestError, match="no caption yet"):
        human_verdict(info(captioned(generation=6)), KEYS, Change(alt="x"), "ana")


@pytest.mark.parametrize(
    ("meta", "change", "message"),
    [
        ({"caption": "owner's"}, Change(caption="x"), "owner already uses"),
        (captioned(), Change(), "give a new caption"),
        (captioned(), Change(caption=" \n "), "empty"),
        (captioned(), Change(caption="x", approve=True), "not both"),
        ({}, Change(approve=True), "no caption of this upload"),
        (captioned(**{"caption-status": "blocked"}), Change(approve=True), "no caption"),
        (captioned(**HUMAN), Change(approve=True), "a person wrote this caption"),
    ],
)
def test_edits_that_cannot_be_written_say_why(
    meta: dict[str, str], change: Change, message: str
) -> None:
    with pytest.raises(BadRequestError, match=message):
        human_verdict(info(meta), KEYS, change, "ana")


def test_reviewer_names_and_tags_are_one_printable_line() -> None:
    assert reviewer("ana\x1b[2J\n@example.com") == "ana [2J @example.com"
    assert split_tags(" cat, ,sofa\n, ") == ("cat", "sofa")
    with pytest.raises(BadRequestError):
        reviewer("\n")


def make(storage: MemoryStorage, describer: ScriptedDescriber) -> Captioner:
    return Captioner(
        storage=storage,
        describer=describer,
        prepare=partial(prepare, max_edge=768, max_pixels=50_000_000),
        config=PipelineConfig(max_bytes=5_000_000, max_concurrency=2),
    )


async def test_a_person_saving_while_the_model_describes_wins_the_race() -> None:
    storage = MemoryStorage()
    storage.put(B, "cat.jpg", images.photo())

    class PersonMeanwhile(ScriptedDescriber):
        async def describe(self, image, spec=None):  # type: ignore[no-untyped-def]
            now = storage.objects[(B, "cat.jpg")].info
            said = human_verdict(now, KEYS, Change(caption="Miso."), "ana")
            person = Recorder(storage, KEYS, "fake-model")
            await person.write(ObjectRef(B, "cat.jpg"), now, said, refit=False)
            return await super().describe(image, spec)

    info_now = storage.objects[(B, "cat.jpg")].info
    result = await make(storage, PersonMeanwhile()).caption_object(
        ObjectRef(B, "cat.jpg", info_now.generation)
    )
    assert (result.outcome, result.reason) == (Outcome.SKIPPED, "human")
    meta = storage.metadata(B, "cat.jpg")
    assert (meta["caption"], meta["caption-source"]) == ("Miso.", "human")


async def test_a_persons_save_after_any_change_writes_nothing_and_says_changed() -> None:
    storage = MemoryStorage()
    before = storage.put(B, "cat.jpg", images.photo(), metadata=captioned(generation=1001))
    storage.owner_edits(B, "cat.jpg", {"sku": "9"})
    said = human_verdict(before, KEYS, Change(caption="Mine."), "ana")
    result = await Recorder(storage, KEYS, "m").write(
        ObjectRef(B, "cat.jpg"), before, said, refit=False
    )
    assert (result.outcome, result.reason) == (Outcome.SKIPPED, "changed")
    assert storage.metadata(B, "cat.jpg")["caption"] == "A cat."
    assert len(storage.patches) == 1  # tried once, under the metageneration it read


def test_keeping_a_new_caption_records_its_model_and_the_approval() -> None:
    spec = CaptionSpec("Say more.", structured=False)
    said = kept_verdict(KEYS, spec, Description("A grey cat.", "gemini-x"), "gemini-x", "ana")
    assert said.model == "gemini-x"
    assert said.review == Review("approved", "ana")
    assert said.provenance["caption-prompt"] == spec.fingerprint
    with pytest.raises(BadRequestError):
        kept_verdict(KEYS, spec, Description(None, "gemini-x", "SAFETY"), "gemini-x", "ana")


def test_show_and_export_say_who_wrote_the_caption() -> None:
    model = record_of(info(captioned()), KEYS)
    assert (model.written_by, model.review) == ("captioner", None)
    assert "by:      old-model (model)" in as_text(model)
    person = record_of(info(captioned(**HUMAN, **{"caption-reviewed": "2025-02-02T00:00:00Z"})),
                       KEYS)  # fmt: skip
    assert as_json(person)["written_by"] == "person"
    assert as_json(person)["reviewed_by"] == "ana"
    assert "by:      ana (a person, 2025-02-02T00:00:00Z)" in as_text(person)
    approved = record_of(info(captioned(**APPROVED)), KEYS)
    assert (approved.written_by, approved.review) == ("captioner", "approved")
    assert "old-model (model), approved by ana" in as_text(approved)
