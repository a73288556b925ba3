"""The real ``assemblyai`` SDK, pointed at the gateway only through its environment
variables (ASSEMBLYAI_BASE_URL, ASSEMBLYAI_LLM_GATEWAY_BASE_URL), against the simulator.

The SDK runs in a child process, exactly as a user's program would, while the gateway and
the simulator serve from this test's event loop.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import textwrap

from gateway.sim.app import SimConfig
from tests.helpers import metric, stack

SCRIPT = textwrap.dedent(
    """
    import json, os, tempfile
    import assemblyai as aai

    aai.settings.polling_interval = 0.1  # the SDK's 3 s, scaled down with the simulated job
    out = {}

    # Pre-recorded: upload a local file, transcribe, poll until done.
    with tempfile.NamedTemporaryFile(suffix=".wav", delete=False) as f:
        f.write(b"RIFF" + b"\\0" * 4096)
    t = aai.Transcriber().transcribe(f.name)
    out["upload_status"] = t.status.value if hasattr(t.status, "value") else str(t.status)
    t = aai.Transcriber().transcribe("https://example.com/a.mp3?sim_seconds=0.3")
    out["status"] = str(t.status.value)
    out["text"] = t.text
    out["sentences"] = len(t.get_sentences())
    out["paragraphs"] = len(t.get_paragraphs())
    out["srt"] = t.export_subtitles_srt().startswith("1")
    out["vtt"] = t.export_subtitles_vtt().startswith("WEBVTT")
    out["search"] = [m.text for m in t.word_search(["simulated"])]
    again = aai.Transcript.get_by_id(t.id)
    out["get_by_id"] = again.id == t.id and again.text == t.text
    failed = aai.Transcriber().transcribe("https://example.com/bad.mp3?sim_seconds=0.1&sim_fail=1")
    out["failed"] = [str(failed.status.value), failed.error]
    page = aai.Transcriber().list_transcripts()
    out["list"] = [page.page_details.current_url, len(page.transcripts)]

    # LLM Gateway: models, a completion, a streamed completion, understanding.
    gw = aai.LLMGateway()
    out["models"] = [m.id for m in gw.models.list().data]
    c = gw.chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "hi"}])
    out["completion"] = c.choices[0].message.content
    hi = [{"role": "user", "content": "hi"}]
    chunks = gw.chat.completions.create(model="gpt-5", messages=hi, stream=True)
    out["streamed"] = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    try:
        gw.chat.completions.create(model="", messages=[])
    except Exception as exc:
        out["bad_model"] = [type(exc).__name__, getattr(exc, "status_code", None), str(exc)]
    print("RESULT " + json.dumps(out))
    """
)


async def run_sdk(gateway_url: str, key: str = "sdk-test-key") -> dict:  # type: ignore[type-arg]
    env = {
        **os.environ,
        "ASSEMBLYAI_BASE_URL": gateway_url,
        "ASSEMBLYAI_LLM_GATEWAY_BASE_URL": gateway_url,
        "ASSEMBLYAI_API_KEY": key,
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SCRIPT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    lines = [line for line in stdout.decode().splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, stderr.decode()[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])  # type: ignore[no-any-return]


async def test_sdk_through_the_gateway() -> None:
    async with stack(SimConfig(job_seconds=0.3), transcripts={"poll_refresh_s": 0.1}) as s:
        out = await run_sdk(s.url)
        assert out["upload_status"] == "completed"
        assert out["status"] == "completed" and out["text"].startswith("Simulated transcript")
        assert out["sentences"] == 1 and out["paragraphs"] == 1 and out["srt"] and out["vtt"]
        assert out["search"] == ["simulated"] and out["get_by_id"]
        assert out["failed"][0] == "error" and "Simulated failure" in out["failed"][1]
        assert out["list"][0].startswith(s.url + "/v2/transcript")  # rewritten to the gateway
        assert out["models"] == ["claude-sonnet-4-6", "gpt-5", "gemini-2.5-flash"]
        assert out["completion"] == "Simulated answer from gpt-5."
        assert out["streamed"].strip() == "Simulated answer from gpt-5."
        assert out["bad_model"][1] == 400 and "`model` is required" in out["bad_model"][2]
        assert s.sim.recorder.violations == []
        # Every request the SDK made went through the admission engine.
        forwarded = len(s.sim.seen)
        assert metric(s.registry, "aai_gateway_admissions_total", limit="requests") == forwarded


async def test_sdk_waits_in_the_gateway_instead_of_failing() -> None:
    """With a tight LLM limit the SDK's calls queue in the gateway; none fails with 429."""
    limits = {"llm_requests": {"limit": 2, "window_s": 1.0}}
    sim_cfg = SimConfig(llm_limit=2, llm_window_s=1.0)
    script = textwrap.dedent(
        """
        import json, assemblyai as aai
        from concurrent.futures import ThreadPoolExecutor
        gw = aai.LLMGateway()
        def ask(i):
            c = gw.chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": str(i)}])
            return c.choices[0].message.content
        with ThreadPoolExecutor(6) as pool:
            print("RESULT " + json.dumps(list(pool.map(ask, range(6)))))
        """
    )
    async with stack(sim_cfg, limits=limits, queue={"llm_max_wait_s": 10}) as s:
        env = {**os.environ, "ASSEMBLYAI_LLM_GATEWAY_BASE_URL": s.url, "ASSEMBLYAI_API_KEY": "k"}
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            script,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, stderr.decode()[-2000:]
        answers = json.loads(stdout.decode().split("RESULT ")[1])
        assert answers == ["Simulated answer from gpt-5."] * 6
        assert s.sim.recorder.violations == []
