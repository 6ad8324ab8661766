"""The RAG generator on a tiny random Llama with SmolLM2's tokenizer: its prompts are the text's
tokens, its scores a plain transformers forward's, its losses the hand-computed marginals, its
cached decoding the step-by-step recomputation, and thorough decoding scores every hypothesis
under every block."""

import math

import pytest
import torch

from realm.modeling.readers.lora import LoraSettings
from realm.modeling.rag import (RAGGenerator, decode, rag_sequence_decode,
                                rag_sequence_log_likelihood, rag_sequence_loss, rag_token_decode,
                                rag_token_log_likelihood, rag_token_loss)

QUESTIONS = ["what is the capital of australia?", "who painted the mona lisa"]
BLOCKS = [[("Canberra", "Canberra is the capital city of Australia."),
           ("Perth", "Perth is the capital of Western Australia, on the Swan River.")],
          [("Mona Lisa", "The Mona Lisa is a portrait painted by Leonardo da Vinci."), None]]
LOGITS = torch.tensor([[1.0, -0.5], [0.3, 0.0]])  # [B, k]


@pytest.fixture(scope="module")
def generator(lm_tokenizer, make_tiny_lm):
    return RAGGenerator(make_tiny_lm(lm_tokenizer), lm_tokenizer, precision="fp32")


def prompt_ids(tok, question, block):
    """The prompt's ids, from the whole text."""
    text = (f"Question: {question}\nAnswer:" if block is None
            else f"{block[0]}\n{block[1]}\n\nQuestion: {question}\nAnswer:")
    return tok(text, add_special_tokens=False)["input_ids"]


def reference_log_probs(lm, prompt, ids):
    """``[T]`` log p(ids_t | prompt, ids_<t) from one plain forward without cache."""
    row = torch.tensor([list(prompt) + list(ids)])
    with torch.no_grad():
        log_probs = torch.log_softmax(lm(input_ids=row).logits[0].float(), dim=-1)  # [L, V]
    return torch.stack([log_probs[len(prompt) + t - 1, i] for t, i in enumerate(ids)])


# -- prompts ------------------------------------------------------------------------------------

def test_rows_are_the_texts_tokens_and_only_the_block_is_cut(generator, lm_tokenizer):
    inputs = generator.build_inputs(QUESTIONS, BLOCKS, [["Canberra", "Canberra, ACT"],
                                                        "Leonardo da Vinci"])
    answer = lm_tokenizer(" Canberra\n", add_special_tokens=False)["input_ids"]
    row = inputs.input_ids[0][inputs.attention_mask[0].bool()].tolist()
    assert row == prompt_ids(lm_tokenizer, QUESTIONS[0], BLOCKS[0][0]) + answer
    assert inputs.targets[0][inputs.target_mask[0]].tolist() == answer
    assert answer[-1] == lm_tokenizer("\n", add_special_tokens=False)["input_ids"][0]
    assert inputs.input_ids[0, inputs.positions[0, :len(answer)] + 1].tolist() == answer
    closed = inputs.input_ids[5][inputs.attention_mask[5].bool()].tolist()  # question 1, block 1
    assert closed[: -len(inputs.targets[5][inputs.target_mask[5]])] == prompt_ids(
        lm_tokenizer, QUESTIONS[1], None)
    assert inputs.answer_mask.tolist() == [[True, True], [True, False]]
    assert len(inputs.input_ids) == 3 * 2  # three real answers, two blocks each

    short = RAGGenerator(generator.lm, lm_tokenizer, max_length=24).build_inputs(
        QUESTIONS[:1], BLOCKS[:1], ["Canberra"])
    question = lm_tokenizer(f"\n\nQuestion: {QUESTIONS[0]}\nAnswer:",
                            add_special_tokens=False)["input_ids"]
    for r in range(2):
        row = short.input_ids[r][short.attention_mask[r].bool()].tolist()
        assert len(row) == 24 and row[-len(answer):] == answer
        assert row[-len(answer) - len(question): -len(answer)] == question
        assert row[:2] == prompt_ids(lm_tokenizer, QUESTIONS[0], BLOCKS[0][r])[:2]  # its title


def test_bad_questions_are_errors_naming_them(generator):
    with pytest.raises(ValueError, match=r"question 1 \(' '\) is empty"):
        generator.score(["who?", " "], [[None], [None]], ["a", "b"])
    long = "why " * 40
    small = RAGGenerator(generator.lm, generator.tokenizer, max_length=32)
    with pytest.raises(ValueError, match=r"question 0 \('why why.*over the generator's limit "
                                         r"of 32"):
        small.score([long], [[None]], ["a"])
    with pytest.raises(ValueError, match="question 0"):
        rag_token_decode(small, [long], [[None]], torch.zeros(1, 1))
    with pytest.raises(ValueError, match=r"answer 1 \(''\) is empty"):
        generator.score(["who?"], [[None]], [["a", ""]])
    with pytest.raises(ValueError, match="same number"):
        generator.score(QUESTIONS, [BLOCKS[0], BLOCKS[1][:1]], ["a", "b"])
    with pytest.raises(ValueError, match="do not match"):
        decode(generator, QUESTIONS, BLOCKS, torch.zeros(2, 3))


# -- losses -------------------------------------------------------------------------------------

def test_losses_equal_hand_computed_marginals():
    torch.manual_seed(0)
    b, a, k, t = 2, 3, 4, 5
    logits = torch.randn(b, k)
    lp = -torch.rand(b, a, k, t) * 3  # [B, A, k, T]
    lengths = [[5, 2, 3], [4, 1, 5]]
    for i in range(b):
        for j in range(a):
            lp[i, j, :, lengths[i][j]:] = 0.0  # padding
    answer_mask = torch.tensor([[True, True, False], [True, True, True]])
    lp[0, 2] = -100.0  # a missing answer: never counts
    seq, tok = [], []
    for i in range(b):
        p_z = [math.exp(x) for x in torch.log_softmax(logits[i], 0).tolist()]
        p_seq = p_tok = 0.0
        for j in range(a):
            if not answer_mask[i, j]:
                continue
            p_seq += sum(p_z[z] * math.exp(sum(lp[i, j, z, s].item()
                                               for s in range(lengths[i][j])))
                         for z in range(k))
            p_tok += math.prod(sum(p_z[z] * math.exp(lp[i, j, z, s].item()) for z in range(k))
                               for s in range(lengths[i][j]))
        seq.append(math.log(p_seq))
        tok.append(math.log(p_tok))
    got_seq = rag_sequence_log_likelihood(logits, lp, answer_mask)
    got_tok = rag_token_log_likelihood(logits, lp, answer_mask)
    torch.testing.assert_close(got_seq, torch.tensor(seq), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_tok, torch.tensor(tok), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rag_sequence_loss(logits, lp, answer_mask), -got_seq.mean())
    torch.testing.assert_close(rag_token_loss(logits, lp, answer_mask), -got_tok.mean())
    one = lp[:, 0]  # [B, k, T]: one answer each, as the mask's first column
    torch.testing.assert_close(rag_sequence_log_likelihood(logits, one),
                               rag_sequence_log_likelihood(logits, lp[:, :1]))
    assert not torch.allclose(got_seq, got_tok)  # the two objectives differ
    with pytest.raises(ValueError, match="at least one answer"):
        rag_token_loss(logits, lp, torch.zeros(b, a, dtype=torch.bool))


# -- scoring ------------------------------------------------------------------------------------

def test_score_equals_a_full_forward(generator, lm_tokenizer):
    answers = [["Canberra", "the city of Canberra"], ["Leonardo da Vinci"]]
    scores = generator.score(QUESTIONS, BLOCKS, answers)
    longest = max(len(lm_tokenizer(f" {g}\n")["input_ids"]) for golds in answers for g in golds)
    assert scores.token_log_probs.shape == (2, 2, 2, longest)  # [B, A, k, T]
    for b, golds in enumerate(answers):
        for a, gold in enumerate(golds):
            ids = lm_tokenizer(f" {gold}\n", add_special_tokens=False)["input_ids"]
            for z, block in enumerate(BLOCKS[b]):
                want = reference_log_probs(generator.lm, prompt_ids(lm_tokenizer, QUESTIONS[b],
                                                                    block), ids)
                got = scores.token_log_probs[b, a, z]
                torch.testing.assert_close(got[: len(ids)], want, rtol=1e-4, atol=1e-4)
                assert (got[len(ids):] == 0).all()
            assert scores.target_mask[b, a].sum() == len(ids)
    assert (scores.token_log_probs[1, 1] == 0).all() and not scores.answer_mask[1, 1]


def test_a_frozen_generator_takes_no_gradient_and_a_full_one_does(lm_tokenizer, make_tiny_lm):
    logits = LOGITS.clone().requires_grad_(True)
    frozen = RAGGenerator(make_tiny_lm(lm_tokenizer), lm_tokenizer, precision="fp32")
    out = frozen.score(QUESTIONS, BLOCKS, ["Canberra", "Leonardo"])
    assert not out.token_log_probs.requires_grad
    rag_sequence_loss(logits, out.token_log_probs, out.answer_mask).backward()
    assert logits.grad.abs().sum() > 0  # the retriever's logits still learn
    full = RAGGenerator(make_tiny_lm(lm_tokenizer), lm_tokenizer, mode="full")
    out = full.score(QUESTIONS, BLOCKS, ["Canberra", "Leonardo"])
    rag_token_loss(LOGITS, out.token_log_probs, out.answer_mask).backward()
    assert full.lm.get_input_embeddings().weight.grad.abs().sum() > 0


def test_lora_trains_the_adapter_alone_from_its_base(lm_tokenizer, make_tiny_lm):
    base = RAGGenerator(make_tiny_lm(lm_tokenizer), lm_tokenizer, precision="fp32")
    lora = RAGGenerator(make_tiny_lm(lm_tokenizer), lm_tokenizer, mode="lora",
                        lora=LoraSettings(rank=4))
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert lora.lora.rank == 4
    out = lora.score(QUESTIONS, BLOCKS, ["Canberra", "Leonardo"])
    torch.testing.assert_close(out.token_log_probs,  # B starts at 0: the base's scores
                               base.score(QUESTIONS, BLOCKS, ["Canberra", "Leonardo"]
                                          ).token_log_probs)
    rag_sequence_loss(LOGITS, out.token_log_probs, out.answer_mask).backward()
    assert sum(float(p.grad.abs().sum()) for n, p in lora.named_parameters()
               if ".lora_B." in n) > 0
    assert (decode(lora, QUESTIONS, BLOCKS, LOGITS, method="greedy", max_answer_tokens=4).answers
            == decode(base, QUESTIONS, BLOCKS, LOGITS, method="greedy",
                      max_answer_tokens=4).answers)
    with pytest.raises(ValueError, match="adapter"):
        RAGGenerator(lora.lm, lm_tokenizer, mode="full")


# -- decoding -----------------------------------------------------------------------------------

def reference_greedy(generator, tok, max_tokens):
    """RAG-Token greedy decoding of every question, the whole forward again at every step (no
    cache): ``(ids, score)`` of each."""
    stop, blank = generator.stop_mask(), generator.blank_mask()
    out = []
    for b, question in enumerate(QUESTIONS):
        rows = [prompt_ids(tok, question, z) for z in BLOCKS[b]]
        log_p_z = torch.log_softmax(LOGITS[b], 0)
        ids, score = [], 0.0
        while len(ids) < max_tokens:
            with torch.no_grad():
                steps = torch.stack([torch.log_softmax(generator.lm(
                    input_ids=torch.tensor([r + ids])).logits[0, -1], -1) for r in rows])
            mixture = torch.logsumexp(log_p_z[:, None] + steps, dim=0)  # [V]
            if all(blank[i] for i in ids):
                mixture[stop] = float("-inf")  # no empty answer
            token = int(mixture.argmax())
            ids.append(token)
            score += float(mixture[token])
            if stop[token]:
                break
        out.append((ids, score))
    return out


def test_rag_token_greedy_equals_a_step_by_step_reference(generator, lm_tokenizer):
    out = rag_token_decode(generator, QUESTIONS, BLOCKS, LOGITS, max_answer_tokens=8)
    for b, (ids, score) in enumerate(reference_greedy(generator, lm_tokenizer, 8)):
        best = out.hypotheses[b][0]
        assert best.ids == tuple(ids)
        assert out.answers[b] == generator.answer_text(ids)
        assert out.scores[b].item() == pytest.approx(score, abs=1e-3)
        rows = [prompt_ids(lm_tokenizer, QUESTIONS[b], z) for z in BLOCKS[b]]
        per_block = torch.stack([reference_log_probs(generator.lm, r, ids).sum() for r in rows])
        torch.testing.assert_close(best.block_log_probs, per_block, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(out.posteriors[b],
                                   torch.softmax(torch.log_softmax(LOGITS[b], 0) + per_block, 0),
                                   rtol=1e-4, atol=1e-4)


def test_an_answer_ends_at_its_stop_token_never_before_some_text(generator, lm_tokenizer):
    """(A random LM writes no newline: the first new token of its greedy answer is made the
    stop, then the token it repeats before it whitespace.)"""
    free = rag_token_decode(generator, QUESTIONS, BLOCKS, LOGITS,
                            max_answer_tokens=12).hypotheses[0][0].ids
    stop = next(t for i, t in enumerate(free) if t not in free[:i] and i > 0)
    stopping = RAGGenerator(generator.lm, lm_tokenizer)
    stopping.stop_ids = torch.zeros(len(lm_tokenizer), dtype=torch.bool)
    stopping.stop_ids[stop] = True
    out = rag_token_decode(stopping, QUESTIONS, BLOCKS, LOGITS, max_answer_tokens=12)
    reference = reference_greedy(stopping, lm_tokenizer, 12)
    assert [h[0].ids for h in out.hypotheses] == [tuple(ids) for ids, _ in reference]
    assert reference[0][0] == list(free[: free.index(stop) + 1])  # it stopped there
    for method in ("beam", "thorough", "fast"):
        out = decode(stopping, QUESTIONS, BLOCKS, LOGITS, method=method, beam_size=2,
                     max_answer_tokens=12)
        for h in (h for hyps in out.hypotheses for h in hyps):
            assert stop not in h.ids[:-1] and (h.ids[-1] == stop or len(h.ids) == 12)
    stopping.blank_ids = torch.zeros(len(lm_tokenizer), dtype=torch.bool)
    stopping.blank_ids[free[0]] = True  # as if it wrote whitespace: no stop after it alone
    out = rag_token_decode(stopping, QUESTIONS, BLOCKS, LOGITS, max_answer_tokens=12)
    reference = reference_greedy(stopping, lm_tokenizer, 12)
    assert [h[0].ids for h in out.hypotheses] == [tuple(ids) for ids, _ in reference]
    assert reference[0][0][: free.index(stop) + 1] != list(free[: free.index(stop) + 1])
    for h in (h for hyps in out.hypotheses for h in hyps):
        assert not (h.ids[-1] == stop and set(h.ids[:-1]) <= {free[0]})


def test_a_frozen_bf16_generator_decodes_through_bf16_copies_made_once(lm_tokenizer,
                                                                       make_tiny_lm,
                                                                       weight_casts, monkeypatch):
    """Autocast would cast every weight at every decoding step; a frozen bf16 generator copies
    each linear weight once and decodes what autocast over its fp32 weights decodes."""
    lm = make_tiny_lm(lm_tokenizer)
    bf16 = RAGGenerator(lm, lm_tokenizer, precision="bf16")
    casts = weight_casts(lm)
    out = rag_token_decode(bf16, QUESTIONS, BLOCKS, LOGITS, max_answer_tokens=6)
    monkeypatch.undo()
    assert len(casts) == sum(isinstance(m, torch.nn.Linear) for m in lm.modules())
    assert all(p.dtype == torch.float32 for p in lm.parameters())
    autocast_only = RAGGenerator(lm, lm_tokenizer, precision="bf16")
    autocast_only.bf16_copies = lambda: None  # autocast casting the fp32 weights each time
    want = rag_token_decode(autocast_only, QUESTIONS, BLOCKS, LOGITS, max_answer_tokens=6)
    assert [h[0].ids for h in out.hypotheses] == [h[0].ids for h in want.hypotheses]
    torch.testing.assert_close(out.scores, want.scores, rtol=0, atol=1e-2)


def test_rag_token_beam_scores_are_the_mixture_of_their_tokens(generator, lm_tokenizer):
    out = decode(generator, QUESTIONS, BLOCKS, LOGITS, method="beam", beam_size=3,
                 max_answer_tokens=5)
    for b, hyps in enumerate(out.hypotheses):
        assert 1 <= len(hyps) <= 3 and [h.score for h in hyps] == sorted(
            [h.score for h in hyps], reverse=True)
        h = hyps[-1]
        steps = torch.stack([reference_log_probs(generator.lm, prompt_ids(lm_tokenizer,
                                                                          QUESTIONS[b], z), h.ids)
                             for z in BLOCKS[b]])  # [k, T]
        want = rag_token_log_likelihood(LOGITS[b: b + 1], steps[None])
        assert h.score == pytest.approx(float(want), abs=1e-3)


def test_thorough_scores_every_hypothesis_under_every_block_and_fast_does_not(generator,
                                                                               lm_tokenizer):
    kwargs = dict(beam_size=3, max_answer_tokens=4)
    thorough = rag_sequence_decode(generator, QUESTIONS, BLOCKS, LOGITS, **kwargs)
    fast = decode(generator, QUESTIONS, BLOCKS, LOGITS, method="fast", **kwargs)
    log_p_z = torch.log_softmax(LOGITS[0], 0)
    only_1 = [h for h in thorough.hypotheses[0] if h.found.tolist() == [False, True]]
    assert only_1, "block 1's beam found nothing that block 0's did not"
    h = only_1[0]
    prompt = prompt_ids(lm_tokenizer, QUESTIONS[0], BLOCKS[0][0])
    assert torch.isfinite(h.block_log_probs).all()
    assert float(h.block_log_probs[0]) == pytest.approx(
        float(reference_log_probs(generator.lm, prompt, h.ids).sum()), abs=1e-3)
    assert h.score == pytest.approx(float(torch.logsumexp(log_p_z + h.block_log_probs, 0)),
                                    abs=1e-5)
    for hyps in thorough.hypotheses:
        assert all(torch.isfinite(x.block_log_probs).all() for x in hyps)
    same = next(x for x in fast.hypotheses[0] if x.ids == h.ids)
    assert same.block_log_probs[0] == float("-inf")
    assert float(same.block_log_probs[1]) == pytest.approx(float(h.block_log_probs[1]), abs=1e-3)
    assert same.score == pytest.approx(float(log_p_z[1] + same.block_log_probs[1]), abs=1e-5)
    assert sorted(x.ids for x in fast.hypotheses[0]) == sorted(x.ids
                                                             for x in thorough.hypotheses[0])
    best = fast.hypotheses[0][0]
    want = torch.softmax(log_p_z + best.block_log_probs, 0)
    torch.testing.assert_close(fast.posteriors[0], want)


@pytest.mark.slow
def test_smollm2_answers_from_a_block_that_holds_the_answer():
    generator = RAGGenerator.from_checkpoint("smollm2", precision="fp32")
    blocks = [[("Canberra", "Canberra is the capital city of Australia."),
               ("Sydney", "Sydney is the largest city in Australia.")]]
    logits = torch.tensor([[2.0, 0.0]])
    for method in ("greedy", "thorough"):
        out = decode(generator, ["What is the capital of Australia?"], blocks, logits,
                     method=method, beam_size=2)
        assert "Canberra" in out.answers[0], (method, out.answers)
        assert out.posteriors[0, 0] > 0.5
