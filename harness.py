"""
Our models inside lm-evaluation-harness (pip install lm_eval): eval.py --tasks=... runs the paper's
Table 2 (LAMBADA, PIQA, ARC-Easy, ARC-Challenge, OpenBookQA, WinoGrande, zero-shot) on a checkpoint
or a Hugging Face folder. The harness turns each task into requests of three kinds, answered here:
the log-likelihood of a continuation after a context (batched, longest first), of a whole text in
rolling windows of block_size (its perplexity tasks), and greedy generation until a stop string.
Texts are split into tokens as the harness's own Hugging Face adapter does (TemplateLM's rules), so
a Hugging Face folder scores here what it scores there. Every row has the training length's pseudo
mass (SM-I), so padding a batch changes no row: texts of any lengths share a batch, padded on the
right for log-likelihoods (no real token comes after the padding, and no mask is needed) and on the
left for generation (model.generate_tokens, which hides the padding and gives each row its own
positions).
"""

import torch
import torch.nn.functional as F
from lm_eval import simple_evaluate
from lm_eval.api.model import TemplateLM
from lm_eval.tasks import TaskManager
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from tokenizer import hf_tokenizer, read_json, tokenizer_from_meta


class StableMaskLM(TemplateLM):
    """A GPT of model.py as an lm_eval model."""

    def __init__(self, model, meta, device, autocast, batch_size=8, tokenizer_folder=None):
        super().__init__()
        self.model, self.meta, self._device, self.autocast, self.batch_size = (
            model, meta, device, autocast, batch_size)
        self.max_length = model.config.block_size
        self.encode, self.decode = tokenizer_from_meta(meta, tokenizer_folder, show_special=False)
        if meta.get('eot_token') is None:
            raise ValueError("this model's tokenizer has no end-of-text token, "
                             "which the harness starts texts with")
        self.hf, self.bos = None, None
        # a Hugging Face tokenizer: its beginning-of-sequence token, as transformers reads it
        if meta['tokenizer'] == 'hf':
            folder = tokenizer_folder or meta['tokenizer_path']
            self.hf = hf_tokenizer(folder, meta['tokenizer_sha256'])
            bos = read_json(folder, 'tokenizer_config.json').get('bos_token')
            self.bos = self.hf.token_to_id(bos['content'] if isinstance(bos, dict) else bos) if bos else None
            # a text that starts with it gets no BOS
            self.prefix = self.hf.decode([self.prefix_token_id], skip_special_tokens=False)

    @property
    def eot_token_id(self):
        return self.meta['eot_token']

    # what a text with no context is predicted after: BOS where there is one, as lm_eval's hf
    @property
    def prefix_token_id(self):
        return self.bos if self.bos is not None else self.eot_token_id

    def tok_encode(self, string, add_special_tokens=None, **kwargs):
        if self.hf is None:
            return list(self.encode(string))
        # the tokenizer's own default (a BOS, say), unless the text starts with one
        if add_special_tokens is None:
            add_special_tokens = not string.startswith(self.prefix)
        return self.hf.encode(string, add_special_tokens=add_special_tokens).ids

    @torch.no_grad()
    def _logprobs(self, inputs):
        """Log-probabilities (B, T, V), float32, of right-padded token lists. No real row sees the
        padding."""
        length = max(len(row) for row in inputs)
        x = torch.tensor([row + [0] * (length - len(row)) for row in inputs], dtype=torch.long,
                         device=self.device)
        with self.autocast:
            logits, _ = self.model(x, torch.zeros_like(x), pseudo_len=self.model.config.block_size)
        return F.log_softmax(logits.float(), dim=-1)

    def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
        """(log P(continuation | context), whether greedy decoding gives the continuation) for each
        ((context, continuation), context ids, continuation ids). The context is cut from the left
        to fit."""
        # longest first
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1] + requests[i][2]))
        results = [None] * len(requests)
        for first in tqdm(range(0, len(order), self.batch_size), disable=disable_tqdm,
                          desc='log-likelihoods'):
            batch = order[first:first + self.batch_size]
            inputs, targets = [], []
            for i in batch:
                _, context, continuation = requests[i]
                whole = (context + continuation)[-(self.max_length + 1):]
                inputs.append(whole[:-1])
                targets.append(continuation)
            logprobs = self._logprobs(inputs)
            for row, (i, inp, cont) in enumerate(zip(batch, inputs, targets)):
                start = len(inp) - len(cont)
                scores = logprobs[row, start:len(inp)]  # the rows that predict the continuation
                wanted = torch.tensor(cont, device=scores.device)
                results[i] = (scores.gather(1, wanted[:, None]).sum().item(),
                              bool((scores.argmax(-1) == wanted).all()))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        """The log-likelihood of each whole text, in disjoint windows of max_length tokens."""
        spans, owners = [], []
        for index, (text,) in enumerate(request.args for request in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    self.tok_encode(text), self.prefix_token_id, self.max_length, context_len=1)):
                spans.append(((None, None), context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(spans, disable_tqdm=disable_tqdm)):
            totals[owner] += logprob
        return totals

    def generate_until(self, requests, disable_tqdm=False):
        """Greedy continuations, each cut at the first of its stop strings. Contexts of any lengths
        decode together, batch_size at a time, longest first (model.generate_tokens pads them on the
        left); each row ends at the end-of-text token, a stop string or its own max_gen_toks."""
        jobs = []
        for index, request in enumerate(requests):
            context, settings = request.args
            ids = self.tok_encode(context)[-self.max_length:] or [self.prefix_token_id]
            until = settings.get('until') or []
            until = [until] if isinstance(until, str) else list(until)
            jobs.append((index, ids, until, settings.get('max_gen_toks', 256)))
        # the longest first: a batch pads to its first
        jobs.sort(key=lambda job: -len(job[1]))
        results = [None] * len(requests)
        for first in tqdm(range(0, len(jobs), self.batch_size), disable=disable_tqdm, desc='generations'):
            batch = jobs[first:first + self.batch_size]
            new, done = [[] for _ in batch], [max_new <= 0 for *_, max_new in batch]
            steps = self.model.generate_tokens([ids for _, ids, _, _ in batch],
                                               max(max_new for *_, max_new in batch), temperature=0)
            with torch.no_grad(), self.autocast:
                for step in steps:
                    for row, token in enumerate(step[:, 0].tolist()):
                        if done[row]:
                            continue
                        _, _, until, max_new = batch[row]
                        done[row] = token == self.eot_token_id
                        new[row] += [] if done[row] else [token]
                        done[row] |= (len(new[row]) == max_new
                                      or any(stop in self.decode(new[row]) for stop in until))
                    if all(done):
                        break
            for (index, _, until, _), tokens in zip(batch, new):
                text = self.decode(tokens)
                for stop in until:
                    text = text.split(stop)[0]
                results[index] = text
        return results


def run_tasks(model, meta, tasks, device, autocast, batch_size=8, num_fewshot=0, limit=None,
              include_path=None, tokenizer_folder=None, quiet=False):
    """{task: {metric: (value, stderr)}} of lm_eval's tasks on model. Raises ValueError for a task
    the harness does not know."""
    manager = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    # the harness's own 14,000 task files take seconds to index
    if manager is None or not set(tasks) <= set(manager.all_tasks):
        manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"lm_eval has no task {', '.join(unknown)} "
                         f"(lm_eval ls tasks lists them; --include_path adds your own)")
    lm = StableMaskLM(model, meta, device, autocast, batch_size, tokenizer_folder)
    out = simple_evaluate(lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                          bootstrap_iters=1000, log_samples=False, verbosity='ERROR' if quiet else None)
    results = {}
    for task, metrics in out['results'].items():
        for name, value in metrics.items():
            metric, _, kind = name.partition(',')
            if isinstance(value, (int, float)) and not metric.endswith('_stderr'):
                results.setdefault(task, {})[metric] = (value, metrics.get(f"{metric}_stderr,{kind}", 'n/a'))
    return results
