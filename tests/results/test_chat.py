"""``fedtune chat``: streaming, history and prompts, the decoding loop (against peft's forward for
every PEFT method), one-shot determinism, --compare-base, Ctrl-C, and bad input."""

import io
import json
import os
import signal

import pytest
import torch

from fedtune import cli
from fedtune.chat import (ALPACA_STOPS, Decoder, GenOptions, History, Interrupt, StreamPrinter, Turn,
                          build_prompt, generate, read_prompts)
from fedtune.data import get_template
from fedtune.data.templates import ALPACA_PROMPT_INPUT, ALPACA_PROMPT_NO_INPUT


class CharTok:
    """A tokenizer whose tokens are given strings (id = index), to drive the streamer by hand. The
    piece "\x00" is the first byte of a two-byte character: it decodes to U+FFFD while it is the last
    token, and to nothing once the next token completes the character (as byte-level BPE does)."""

    def __init__(self, pieces):
        self.pieces = pieces

    def decode(self, ids, skip_special_tokens=True):
        ps = [self.pieces[i] for i in ids]
        return "".join(("\ufffd" if k == len(ps) - 1 else "") if p == "\x00" else p for k, p in enumerate(ps))


def _stream(pieces, stops):
    tok, chunks = CharTok(pieces), []
    s = StreamPrinter(tok, chunks.append, stops, skip_prompt=True)
    s.put(torch.tensor([[0]]))  # generate's first call: the prompt, never printed
    for i in range(1, len(pieces)):
        s.put(torch.tensor([i]))
        if s.stopped:
            break
    s.end()
    return s, chunks


def test_streamer_never_prints_a_stop_string_or_what_follows():
    pieces = ["PROMPT", "\n ", "Hel", "lo", " wor", "ld", "\n", "##", "# Instr", "uction:", " more"]
    s, chunks = _stream(pieces, ALPACA_STOPS)
    assert "".join(chunks) == "Hello world" == s.text and s.stopped
    assert not any("#" in c for c in chunks)
    # text is printed as it comes: "Hel" before "lo" arrives, and the "\n" is held until "##" shows
    # it starts a stop string
    assert chunks[:2] == ["Hel", "lo"]
    # the folded history's next turn is cut too, and the blank space before an end is never printed
    s, chunks = _stream(["P", "Yes.", "\n", "\n", "User", ": more?"], ALPACA_STOPS)
    assert "".join(chunks) == "Yes." == s.text and s.stopped
    s, chunks = _stream(["P", "Done", " \n\n"], ALPACA_STOPS)
    assert "".join(chunks) == "Done" == s.text and not s.stopped


def test_streamer_holds_a_half_decoded_character_and_a_possible_stop():
    pieces = ["P", "caf", "\x00", "é!", " #", "# done"]
    s, chunks = _stream(pieces, ("###",))
    assert "\ufffd" not in "".join(chunks)
    assert "".join(chunks) == "café! ## done" == s.text and not s.stopped  # "##" alone is no stop


def test_history_keeps_the_last_n_turns():
    h = History(2)
    for i in range(4):
        h.add(f"q{i}", f"a{i}")
    assert [t.user for t in h.turns] == ["q2", "q3"]
    h0 = History(0)
    h0.add("q", "a")
    assert h0.turns == []


def test_alpaca_prompt_folds_history_into_the_input_and_is_the_training_prompt_without_it():
    tpl = get_template("alpaca")
    assert build_prompt(tpl, None, "Name a fruit") == ALPACA_PROMPT_NO_INPUT.format(instruction="Name a fruit")
    got = build_prompt(tpl, None, "And another?", [Turn("Name a fruit", "Apple."), Turn("Why?", "Tasty.")])
    want = ALPACA_PROMPT_INPUT.format(
        instruction="And another?",
        input="Previous conversation:\nUser: Name a fruit\nAssistant: Apple.\nUser: Why?\nAssistant: Tasty.")
    assert got == want


def test_chat_template_history_is_real_turns():
    from fedtune.config import ModelConfig
    from fedtune.models import load_tokenizer

    tok = load_tokenizer(ModelConfig(name="tiny-llama"))  # SmolLM2's tokenizer and chat template
    got = build_prompt(get_template("chat"), tok, "And another?", [Turn("Name a fruit", "Apple.")])
    want = tok.apply_chat_template([{"role": "user", "content": "Name a fruit"},
                                    {"role": "assistant", "content": "Apple."},
                                    {"role": "user", "content": "And another?"}],
                                   tokenize=False, add_generation_prompt=True)
    assert got == want and got.index("Name a fruit") < got.index("Apple.") < got.index("And another?")


def test_prompt_and_answer_fit_the_context():
    """Oldest turns go first; then the answer's budget shrinks to what the context leaves."""
    from types import SimpleNamespace

    from fedtune.chat import ChatSession
    from fedtune.config import ModelConfig
    from fedtune.models import load_tokenizer

    tok = load_tokenizer(ModelConfig(name="tiny-llama"))
    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=200))
    s = ChatSession(model, tok, get_template("alpaca"), opts=GenOptions(max_new_tokens=60), history=3)
    s.history.add("first " * 120, "old answer")
    s.history.add("second", "recent answer")
    ids, budget = s.prompt_ids("now?")
    text = tok.decode(ids)
    assert budget == 60 and len(ids) + 60 <= 200
    assert "recent answer" in text and "old answer" not in text and "now?" in text
    s.opts = GenOptions(max_new_tokens=500)
    ids, budget = s.prompt_ids("now?")
    assert "recent answer" not in tok.decode(ids) and len(ids) + budget == 200 and budget < 500


@pytest.mark.parametrize("method", ["lora", "prefix", "p_tuning", "prompt_tuning"])
def test_decoder_continues_exactly_what_peft_forward_computes(method, make_adapter):
    """The cached loop's next-token logits equal peft's full forward pass over the whole sequence at
    every step, for every PEFT method (peft's generate does not, for prompt learning)."""
    from peft import PeftModel

    from fedtune.config import ModelConfig
    from fedtune.models import load_model

    base, tok = load_model(ModelConfig(name="tiny-llama"))
    pm = PeftModel.from_pretrained(base.double(), str(make_adapter(method))).double().eval()
    seq = tok("Say apple please")["input_ids"]
    dec = Decoder(pm)
    logits = dec.prefill(seq)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(4):
            x = torch.tensor([seq])
            ref = pm(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, -1]
            torch.testing.assert_close(logits, ref, rtol=0, atol=1e-9)
            t = int(torch.multinomial(torch.softmax(ref, -1), 1, generator=g))
            seq.append(t)
            logits = dec.step(t)


def _greedy_reference(model, ids, n):
    """Greedy decoding by full forward passes, no cache: the independent reference."""
    out = []
    with torch.no_grad():
        for _ in range(n):
            x = torch.tensor([ids + out])
            out.append(int(model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, -1].argmax()))
    return out


def test_generate_greedy_equals_argmax_and_interrupt_stops(make_adapter):
    from peft import PeftModel

    from fedtune.config import ModelConfig
    from fedtune.models import load_model

    base, tok = load_model(ModelConfig(name="tiny-llama"))
    pm = PeftModel.from_pretrained(base, str(make_adapter("prompt_tuning"))).eval()
    ids = tok("Say apple")["input_ids"]
    a = generate(pm, tok, ids, GenOptions(max_new_tokens=6, temperature=0))
    ref = _greedy_reference(pm, ids, 6)
    assert a.tokens == 6 and a.finish == "length"
    assert a.text == tok.decode(ref, skip_special_tokens=True).strip()
    # Ctrl-C: the flag is read after every token
    stop = Interrupt()
    b = generate(pm, tok, ids, GenOptions(max_new_tokens=50, temperature=0), write=lambda s: stop.set(),
                 interrupt=stop)
    assert b.finish == "interrupted" and b.tokens < 50


def test_sigint_while_armed_sets_the_flag_instead_of_raising():
    it = Interrupt()
    before = signal.getsignal(signal.SIGINT)
    with it.armed():
        os.kill(os.getpid(), signal.SIGINT)
    assert it.flag and signal.getsignal(signal.SIGINT) is before


def _chat(capsys, *argv):
    rc = cli.main(["chat", *map(str, argv)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_one_shot_is_deterministic_under_a_seed(make_adapter, capsys):
    """Every answer is drawn from its own generator seeded with --seed: the same prompt gives the same
    sampled text wherever it comes in the list (so also in another invocation), another seed another
    text. (A random tiny model's next-token distributions are nearly uniform whatever the prompt, so two
    prompts under one seed may sample the same tokens: that is not compared.)"""
    d = make_adapter("lora")
    args = (d, "--prompt", "Say apple", "--prompt", "Say banana", "--prompt", "Say apple", "--max-new-tokens", "8",
            "--temperature", "1.0", "--json")
    rc, out1, _ = _chat(capsys, *args, "--seed", "7")
    assert rc == 0
    rows1 = [json.loads(line) for line in out1.splitlines()]
    assert [r["prompt"] for r in rows1] == ["Say apple", "Say banana", "Say apple"] and all(r["answer"] for r in rows1)
    assert rows1[0] == rows1[2]
    _, out2, _ = _chat(capsys, *args, "--seed", "8")
    assert [json.loads(line)["answer"] for line in out2.splitlines()] != [r["answer"] for r in rows1]


def test_compare_base_prints_the_base_models_greedy_answer(make_adapter, capsys):
    from fedtune.config import ModelConfig
    from fedtune.models import load_model

    rc, out, err = _chat(capsys, make_adapter("lora"), "--prompt", "Say apple", "--max-new-tokens", "6",
                         "--temperature", "0", "--compare-base")
    assert rc == 0, err
    assert out.startswith("[adapter] ") and "\n[base]    " in out
    adapter_text, base_text = out[len("[adapter] "):].split("\n[base]    ")
    base, tok = load_model(ModelConfig(name="tiny-llama"))
    ids = tok(ALPACA_PROMPT_NO_INPUT.format(instruction="Say apple"))["input_ids"]
    assert base_text.strip() == tok.decode(_greedy_reference(base, ids, 6), skip_special_tokens=True).strip()
    assert adapter_text.strip() != base_text.strip()  # the adapter changes the answer


def test_prompts_from_stdin_one_answer_each(make_adapter, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("Say apple\n\nSay banana\n"))
    rc, out, _ = _chat(capsys, make_adapter("prefix"), "--max-new-tokens", "3", "--json")
    assert rc == 0 and [json.loads(x)["prompt"] for x in out.splitlines()] == ["Say apple", "Say banana"]
    assert read_prompts(None, None, io.StringIO("a\n b \n")) == ["a", "b"]


def test_chat_on_a_run_directory_and_bad_input(tiny_runs, make_adapter, capsys):
    fed, _ = tiny_runs["fed"]
    rc, out, err = _chat(capsys, fed, "--prompt", "Say apple", "--max-new-tokens", "3")
    assert rc == 0 and out.strip(), err
    local, _ = tiny_runs["local"]
    rc, _, err = _chat(capsys, local, "--prompt", "x")
    assert rc == 2 and "client adapters" in err and f"{local}/adapters/alpha" in err
    rc, _, err = _chat(capsys, fed, "--prompt", "x", "--device", "cuda:7" if torch.cuda.is_available() else "cuda")
    assert rc == 2 and err.startswith("error: --device=cuda") and "Traceback" not in err
    rc, _, err = _chat(capsys, "tiny-llama", "--prompt", "x", "--compare-base")
    assert rc == 2 and "--compare-base needs an adapter" in err
    rc, _, err = _chat(capsys, fed / "metrics.jsonl", "--prompt", "x")
    assert rc == 2 and err.startswith("error:")
    rc, _, err = _chat(capsys, make_adapter("lora"), "--prompt", "x", "--top-p", "0")
    assert rc == 2 and "--top-p" in err


def test_interactive_session_ctrl_c_stops_the_answer_and_ctrl_d_exits(make_adapter):
    """A real terminal (a pty): Ctrl-C mid-answer prints [stopped] and gives a new prompt; /reset
    works; Ctrl-D ends the session with status 0."""
    import select
    import subprocess
    import sys
    import time

    pty = pytest.importorskip("pty")
    main_fd, child_fd = pty.openpty()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    def controlling_terminal():  # a new session whose terminal is the pty, so Ctrl-C becomes SIGINT
        import fcntl
        import termios

        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen([sys.executable, "-m", "fedtune.cli", "chat", str(make_adapter("lora")),
                             "--max-new-tokens", "900"], stdin=child_fd, stdout=child_fd, stderr=child_fd,
                            env=env, preexec_fn=controlling_terminal)
    os.close(child_fd)
    buf = b""

    def until(pattern, timeout=240):
        nonlocal buf
        end = time.time() + timeout
        while pattern not in buf and time.time() < end:
            if select.select([main_fd], [], [], 0.2)[0]:
                try:
                    buf += os.read(main_fd, 4096)
                except OSError:
                    break
        return pattern in buf

    try:
        assert until(b">>> "), buf
        os.write(main_fd, b"Tell me a long story.\r")
        time.sleep(1.0)
        os.write(main_fd, b"\x03")  # Ctrl-C: the terminal sends SIGINT to the session
        assert until(b"[stopped]"), buf
        assert until(b"\r\n\r\n>>> ", 60), buf
        os.write(main_fd, b"/reset\r")
        assert until(b"(conversation forgotten)\r\n\r\n>>> ", 60), buf
        # Ctrl-D once input() waits again: sent earlier, the terminal's cooked mode consumes it as
        # an end of file before readline switches the terminal to its own mode, and it is lost
        time.sleep(1.0)
        os.write(main_fd, b"\x04")  # Ctrl-D
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(main_fd)
