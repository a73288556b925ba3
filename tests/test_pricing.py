"""Pricing: usage × the ``pricing:`` table, pro-rated to the second; unknown models flagged,
never guessed; the table in the config merges over the shipped one."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import PRICES_STREAMING, PRICES_TRANSCRIPTION, ConfigError, Pricing, load_config
from gateway.ledger import Row
from gateway.pricing import price, price_all
from gateway.usage import BILLED_FEATURES

PRICES = Pricing.model_validate(
    {
        "transcription": {"universal-3-pro": 0.36, "speaker_labels": 0.06},
        "streaming": {"universal-streaming": 0.18, "u3-rt-pro": 0.72},
        "llm": {"claude-x": {"input": 3.0, "output": 15.0}},
    }
)


def row(product: str, model: str, metric: str, value: float, project: str = "p") -> Row:
    return Row("2026-12-01", project, "p/k", product, model, "", metric, value)


def test_transcription_is_pro_rated_to_the_second() -> None:
    """61 s of audio at $0.36/h: 61/3600 × 0.36, not a rounded-up minute or hour."""
    cost, unpriced = price(row("transcription", "universal-3-pro", "audio_seconds", 61), PRICES)
    assert cost == pytest.approx(61 / 3600 * 0.36) and not unpriced


def test_an_add_on_feature_is_priced_as_its_own_line() -> None:
    cost, unpriced = price(row("transcription", "speaker_labels", "audio_seconds", 3600), PRICES)
    assert cost == pytest.approx(0.06) and not unpriced


def test_counts_cost_nothing() -> None:
    for r in (
        row("transcription", "universal-3-pro", "transcripts", 5),
        row("streaming", "u3-rt-pro", "sessions", 2),
        row("streaming", "u3-rt-pro", "unreported_sessions", 1),
        row("llm", "claude-x", "requests", 9),
        row("llm", "unknown-llm", "requests", 9),  # a count of an unknown model: nothing to price
    ):
        assert price(r, PRICES) == (0.0, False), r


def test_streaming_bills_session_seconds_not_audio() -> None:
    """A session open 600 s that carried 100 s of audio costs 600 s (what upstream bills)."""
    session = price(row("streaming", "u3-rt-pro", "session_seconds", 600), PRICES)
    audio = price(row("streaming", "u3-rt-pro", "audio_seconds", 100), PRICES)
    assert session == (pytest.approx(600 / 3600 * 0.72), False)
    assert audio == (0.0, False)


def test_a_session_without_speech_model_is_universal_streaming() -> None:
    cost, unpriced = price(row("streaming", "", "session_seconds", 1800), PRICES)
    assert cost == pytest.approx(0.09) and not unpriced


def test_tokens_per_million_input_and_output_apart() -> None:
    cost_in, _ = price(row("llm", "claude-x", "input_tokens", 250_000), PRICES)
    cost_out, _ = price(row("llm", "claude-x", "output_tokens", 1_000), PRICES)
    assert cost_in == pytest.approx(0.75) and cost_out == pytest.approx(0.015)


@pytest.mark.parametrize(
    "r",
    [
        row("transcription", "slam-9", "audio_seconds", 60),
        row("transcription", "", "audio_seconds", 60),  # no model known at all
        row("transcription", "auto_chapters", "audio_seconds", 60),  # a feature with no price
        row("streaming", "whisper-streaming", "session_seconds", 60),
        row("llm", "gpt-unknown", "output_tokens", 10),
        row("voice-agent", "x", "session_seconds", 60),  # a product the table does not know
    ],
)
def test_unknown_models_are_flagged_never_guessed(r: Row) -> None:
    assert price(r, PRICES) == (0.0, True)


def test_no_usage_is_not_unpriced() -> None:
    assert price(row("transcription", "slam-9", "audio_seconds", 0), PRICES) == (0.0, False)


def test_a_group_sums_and_is_unpriced_if_any_row_is() -> None:
    rows = [
        row("transcription", "universal-3-pro", "audio_seconds", 3600),
        row("transcription", "speaker_labels", "audio_seconds", 3600),
        row("llm", "claude-x", "input_tokens", 1_000_000),
    ]
    assert price_all(rows, PRICES) == (pytest.approx(0.36 + 0.06 + 3.0), False)
    cost, unpriced = price_all([*rows, row("llm", "gpt-unknown", "input_tokens", 5)], PRICES)
    assert cost == pytest.approx(3.42) and unpriced


def test_shipped_prices_name_what_usage_records() -> None:
    """The shipped table is dated, keyed by the names usage.py records (speech models, the
    add-on lines of BILLED_FEATURES), and its rates are the ones taken from the public pages."""
    shipped = Pricing()
    assert shipped.taken == "2026-05"
    assert shipped.transcription["universal-3-pro"] == 0.21
    assert shipped.transcription["universal-2"] == shipped.transcription["universal"] == 0.15
    assert shipped.streaming == {"universal-streaming": 0.15, "u3-rt-pro": 0.45}
    assert shipped.llm == {}  # no public per-model table: the account's Rates table says
    features = set(BILLED_FEATURES.values())
    assert {"speaker_labels", "sentiment_analysis", "entity_detection"} <= features
    speech = {"universal-3-pro", "universal-2", "universal"}
    assert set(shipped.transcription) <= features | speech


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_the_config_table_merges_over_the_shipped_one(tmp_path: Path) -> None:
    cfg = load_config(
        write(
            tmp_path,
            """
pricing:
  taken: "2026-11"
  transcription: {universal-3-pro: 0.27, slam-1: 0.37}
  llm:
    claude-sonnet-4-5: {input: 3, output: 15}
""",
        ),
        environ={},
    )
    p = cfg.pricing
    assert p.taken == "2026-11"
    assert p.transcription == {**PRICES_TRANSCRIPTION, "universal-3-pro": 0.27, "slam-1": 0.37}
    assert p.streaming == PRICES_STREAMING
    assert p.llm["claude-sonnet-4-5"].input == 3 and p.llm["claude-sonnet-4-5"].output == 15


def test_defaults_have_the_shipped_prices() -> None:
    assert load_config(None, environ={}).pricing == Pricing()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("pricing: {transcription: {universal-2: -1}}", "pricing.transcription.universal-2"),
        ("pricing: {llm: {m: {input: 1}}}", "pricing.llm.m.output"),
        ("pricing: {storage: {}}", "pricing.storage"),
    ],
)
def test_bad_prices_fail_at_start_with_their_path(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(write(tmp_path, text), environ={})
