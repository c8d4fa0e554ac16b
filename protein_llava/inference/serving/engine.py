"""The server's model worker: jobs from many requests batched into one forward / `generate` per batch.

Each HTTP request becomes one `Job` per prompt on a bounded queue. A single asyncio task gathers jobs for
up to `max_wait_s` (or `max_batch_size`), groups them by what a `generate` call must share (sampling
settings and seed), sorts each group by length so a long prompt does not pad short ones to its size, and
runs each batch in a worker thread. Per row, a stopping criterion ends a job whose client went away or
whose deadline passed, and a streamer hands every new token to that job's stream as it is made.

Rows never affect each other: greedy decoding is prefix-stable, each row is cut to its own
`max_new_tokens` and stop strings, and a batch that fails is retried job by job so one bad prompt costs
only itself.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from ...loading import GREEDY_BELOW
from .prompts import PreparedPrompt


@dataclass(frozen=True)
class Sampling:
    """How tokens are chosen. temperature 0 (or under GREEDY_BELOW) is greedy; a seed makes sampling repeatable (the job then
    runs in a batch of its own, since one `generate` draws from one random stream)."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if not (math.isfinite(self.temperature) and 0 <= self.temperature <= 2):
            raise ValueError(f"temperature must be between 0 and 2, got {self.temperature}")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


@dataclass(frozen=True)
class TokenLogprobs:
    """One token's log-probability and the `top` most likely tokens at its position (id → logprob)."""

    token_id: int
    logprob: float
    top: dict[int, float]


@dataclass
class Completion:
    """What a job produced: the tokens it generated, their text (cut before a stop), why it ended, logprobs."""

    token_ids: list[int]
    """Every token generated, the one that ended generation (a stop token, or the token that completed a
    stop string) included."""
    text: str
    """The generated text without the stop token or stop string."""
    finish_reason: str  # "stop" | "length" | "cancelled"
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    """Per model input position (None for the first); only when the job asked for echo logprobs."""
    logprobs: list[TokenLogprobs] | None = None
    """Per token of `token_ids`; only when the job asked for logprobs."""


class JobCancelled(Exception):
    """The job's deadline passed or its client went away before it finished."""


@dataclass(eq=False)
class Job:
    prompt: PreparedPrompt
    max_new_tokens: int
    sampling: Sampling = Sampling()
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    """Top-N logprobs per generated token (0 = just the chosen token's); None for none."""
    echo_logprobs: bool = False
    """Also the logprob of every prompt token (one extra forward pass)."""
    request_id: int = 0
    stream: Callable[[int], None] | None = None
    """Called from the worker thread with every new token id of this job, as it is generated."""
    future: asyncio.Future | None = field(default=None, repr=False)
    cancelled: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def batch_key(self) -> tuple:
        # Seeded sampling needs its own random stream, hence its own batch.
        return (self.sampling.temperature, self.sampling.top_p, self.sampling.seed, self.request_id if self.sampling.seed is not None else None)

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class BatchStats:
    """Counters shown by /health: how much batching actually happened, and what was refused."""

    batches: int = 0
    prompts: int = 0
    largest_batch: int = 0
    largest_batch_requests: int = 0
    failed_batches: int = 0
    cancelled: int = 0
    queue_full: int = 0


class QueueFull(Exception):
    """More jobs are waiting than the queue takes; the client should retry later."""


class Engine:
    """The queue and the worker task; `submit` from request handlers, `start`/`stop` with the app."""

    def __init__(self, loaded, max_batch_size: int, max_wait_s: float, max_queued: int, max_padding: float = 2.0):
        self.loaded = loaded
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queued = max_queued
        self.max_padding = max_padding
        self.stats = BatchStats()
        self._queue: asyncio.Queue[Job] | None = None
        self._worker: asyncio.Task | None = None
        self._waiting = 0
        self._request_ids = itertools.count()

    @property
    def running(self) -> bool:
        return self._worker is not None and not self._worker.done()

    @property
    def waiting(self) -> int:
        """Jobs submitted and not yet finished (queued or in a running batch)."""
        return self._waiting

    def new_request_id(self) -> int:
        return next(self._request_ids)

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._worker = asyncio.create_task(self._run(), name="protein-llava-engine")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass

    def submit(self, jobs: list[Job]) -> list[asyncio.Future]:
        """Queue a request's jobs (all or none); QueueFull when they do not fit."""
        if self._waiting + len(jobs) > self.max_queued:
            self.stats.queue_full += 1
            raise QueueFull(f"{self._waiting} prompts are waiting; this server queues at most {self.max_queued}")
        loop = asyncio.get_running_loop()
        futures = []
        for job in jobs:
            job.future = loop.create_future()
            job.future.add_done_callback(self._finished)
            self._waiting += 1
            self._queue.put_nowait(job)
            futures.append(job.future)
        return futures

    def _finished(self, future: asyncio.Future) -> None:
        self._waiting -= 1

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            gathered = [await self._queue.get()]
            deadline = loop.time() + self.max_wait_s
            while len(gathered) < self.max_batch_size:
                remaining = deadline - loop.time()
                try:
                    job = self._queue.get_nowait() if remaining <= 0 else await asyncio.wait_for(self._queue.get(), remaining)
                except (asyncio.QueueEmpty, TimeoutError):
                    break
                gathered.append(job)
            live = []
            for job in gathered:
                if job.cancelled.is_set():
                    self.stats.cancelled += 1
                    _resolve(job, error=JobCancelled("cancelled before it ran"))
                elif not job.future.done():
                    live.append(job)
            for batch in form_batches(live, self.max_padding):
                await self._run_batch(batch)

    async def _run_batch(self, batch: list[Job]) -> None:
        self.stats.batches += 1
        self.stats.prompts += len(batch)
        self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
        self.stats.largest_batch_requests = max(self.stats.largest_batch_requests, len({j.request_id for j in batch}))
        try:
            completions = await asyncio.to_thread(run_batch, self.loaded, batch)
        except Exception as error:  # noqa: BLE001 - retried job by job so one failure costs only itself
            self.stats.failed_batches += 1
            if len(batch) == 1:
                _resolve(batch[0], error=error)
                return
            for job in batch:
                await self._run_batch([job])
            return
        for job, completion in zip(batch, completions):
            if completion.finish_reason == "cancelled":
                self.stats.cancelled += 1
            _resolve(job, completion)


def _resolve(job: Job, completion: Completion | None = None, error: Exception | None = None) -> None:
    if job.future is None or job.future.done():
        return
    if error is not None:
        job.future.set_exception(error)
    else:
        job.future.set_result(completion)


def form_batches(jobs: list[Job], max_padding: float, max_new_tokens_ratio: float = 2.0) -> list[list[Job]]:
    """Jobs that can share a `generate` call, in batches of similar size, cheapest batch first.

    Within a sampling group, jobs are sorted by (new tokens, prompt length); a batch is cut wherever padding
    to its longest prompt would exceed `max_padding` × its real tokens, or its largest `max_new_tokens`
    would exceed `max_new_tokens_ratio` × its smallest: a batch runs until its longest row is done, so a
    short answer must not wait inside a long one. Cheap batches run first for the same reason.
    """
    groups: dict[tuple, list[Job]] = {}
    for job in jobs:
        groups.setdefault(job.batch_key, []).append(job)
    batches = []
    for group in groups.values():
        group.sort(key=lambda job: (job.max_new_tokens, job.prompt.num_tokens))
        current: list[Job] = []
        for job in group:
            candidate = [*current, job]
            longest = max(j.prompt.num_tokens for j in candidate)
            padded = len(candidate) * longest
            real = sum(j.prompt.num_tokens for j in candidate)
            too_long = job.max_new_tokens > max_new_tokens_ratio * max(1, candidate[0].max_new_tokens)
            if current and (padded > max_padding * real or too_long):
                batches.append(current)
                candidate = [job]
            current = candidate
        if current:
            batches.append(current)
    return sorted(batches, key=_batch_cost)


def _batch_cost(batch: list[Job]) -> int:
    """A rough cost of a batch: its rows × (prompt + new tokens) of its longest row."""
    return len(batch) * max(job.prompt.num_tokens + job.max_new_tokens for job in batch)


# --- the model work (runs in a worker thread)


class _RowStops(StoppingCriteria):
    """Ends each row on its own: when its job is cancelled, or a stop string appears in its new text."""

    def __init__(self, jobs: list[Job], prompt_length: int, tokenizer):
        self.jobs = jobs
        self.prompt_length = prompt_length
        self.tokenizer = tokenizer
        self.ended_rows: dict[int, int] = {}  # row → how many new tokens it had when it ended

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for row, job in enumerate(self.jobs):
            if job.cancelled.is_set():
                done[row] = True
            elif job.stop:
                # Decoding the whole tail keeps stop strings that span several tokens.
                text = self.tokenizer.decode(input_ids[row, self.prompt_length :], skip_special_tokens=True)
                done[row] = any(stop in text for stop in job.stop)
            if done[row] and row not in self.ended_rows:
                self.ended_rows[row] = input_ids.shape[1] - self.prompt_length
        return done


class _RowStreamer(BaseStreamer):
    """Hands each generated token to its row's job (the first `put` is the prompt, which is skipped)."""

    def __init__(self, jobs: list[Job], stop_token_ids: set[int], stopped_rows: dict[int, int]):
        self.jobs = jobs
        self.stop_token_ids = stop_token_ids
        self.stopped_rows = stopped_rows  # rows the stopping criterion ended; their later tokens are padding
        self.seen_prompt = False
        self.counts = [0] * len(jobs)
        self.ended = [False] * len(jobs)

    def put(self, value: torch.Tensor) -> None:
        if not self.seen_prompt:
            self.seen_prompt = True
            return
        for row, token in enumerate(value.reshape(len(self.jobs), -1)[:, -1].tolist()):
            job = self.jobs[row]
            if self.ended[row] or row in self.stopped_rows or job.stream is None:
                continue
            if token in self.stop_token_ids or self.counts[row] >= job.max_new_tokens:
                self.ended[row] = True
                continue
            self.counts[row] += 1
            job.stream(token)

    def end(self) -> None:
        pass


@torch.inference_mode()
def run_batch(loaded, jobs: list[Job]) -> list[Completion]:
    """One batch of jobs that share sampling settings: echo logprobs by one forward (a context that prompts share
    run once), then `generate`."""
    processor, model, device = loaded.processor, loaded.model, loaded.device
    longest_new = max(job.max_new_tokens for job in jobs)
    if not any(job.echo_logprobs for job in jobs):
        prompt_logprobs = [None] * len(jobs)
    else:
        prompt_logprobs, next_logits = _prompt_logprobs(loaded, jobs)
        if longest_new == 0:
            return [Completion([], "", "length", prompt_logprobs=lp) for lp in prompt_logprobs]
        if longest_new == 1 and jobs[0].sampling.greedy:
            # lm-eval's log-likelihood request (echo, max_tokens=1): the one greedy token is the argmax of
            # the forward just run, so no second pass through `generate`.
            return [
                _one_greedy_token(loaded, job, logits, logprobs) for job, logits, logprobs in zip(jobs, next_logits, prompt_logprobs)
            ]

    input_ids, attention_mask, protein_input_ids = _pad(loaded, jobs, side="left")
    sampling = jobs[0].sampling
    options = {"do_sample": False} if sampling.greedy else {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0}
    want_logits = any(job.logprobs is not None for job in jobs)
    row_stops = _RowStops(jobs, input_ids.shape[1], processor.tokenizer)
    streamer = _RowStreamer(jobs, set(loaded.stop_token_ids), row_stops.ended_rows) if any(job.stream for job in jobs) else None
    # A seeded job draws from its own generator state and leaves the process's untouched.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            **({"protein_input_ids": protein_input_ids} if protein_input_ids is not None else {}),
            max_new_tokens=longest_new,
            **loaded.generation_options(),
            stopping_criteria=StoppingCriteriaList([row_stops]),
            streamer=streamer,
            return_dict_in_generate=True,
            output_logits=want_logits,
            **options,
        )
    new_tokens = output.sequences[:, input_ids.shape[1] :].tolist()  # (batch, new)
    logits = torch.stack(output.logits, dim=1).float() if want_logits else None  # (batch, new, vocab)
    completions = []
    for row, job in enumerate(jobs):
        # A row the stopping criterion ended is padding after that point.
        tokens = new_tokens[row][: min(job.max_new_tokens, row_stops.ended_rows.get(row, job.max_new_tokens))]
        row_logits = logits[row] if logits is not None else None
        completions.append(_finish_row(loaded, job, tokens, row_logits, prompt_logprobs[row]))
    return completions


def _finish_row(loaded, job: Job, tokens: list[int], logits: torch.Tensor | None, prompt_logprobs) -> Completion:
    """A row's new tokens → its completion (`logits`: (new tokens, vocab), the raw scores at each position).

    The text stops before the first stop token or stop string. The token ids and logprobs keep every token
    generated up to and including the one that ended generation, as OpenAI-style servers reply: lm-eval
    scores an echoed prompt by dropping the reply's last token, so a reply that left out a generated stop
    token would cost the continuation its own last token.
    """
    tokenizer = loaded.processor.tokenizer
    text_tokens, stopped = loaded.reply_tokens(tokens)
    finish = "stop" if stopped else "length"
    if stopped:
        tokens = tokens[: len(text_tokens) + 1]
    text = tokenizer.decode(text_tokens, skip_special_tokens=True)
    found = [(text.find(stop), len(stop)) for stop in job.stop if stop in text]
    if found:
        start = min(begin for begin, _ in found)
        stop_end = min(begin + size for begin, size in found)
        text, finish = text[:start], "stop"
        tokens = _tokens_covering(tokenizer, text_tokens, stop_end)  # up to the token that completed the stop
    if job.cancelled.is_set() and finish == "length" and len(tokens) < job.max_new_tokens:
        finish = "cancelled"
    token_logprobs = None
    if job.logprobs is not None:
        row_logprobs = torch.log_softmax(logits[: len(tokens)].float(), dim=-1)
        token_logprobs = [_token_logprobs(row_logprobs[i], token, job.logprobs) for i, token in enumerate(tokens)]
    return Completion(tokens, text, finish, prompt_logprobs, token_logprobs)


def _tokens_covering(tokenizer, tokens: list[int], length: int) -> list[int]:
    """The shortest prefix of `tokens` whose text reaches `length` characters."""
    for end in range(len(tokens) + 1):
        if len(tokenizer.decode(tokens[:end], skip_special_tokens=True)) >= length:
            return tokens[:end]
    return tokens


def _token_logprobs(position_logprobs: torch.Tensor, token: int, top: int) -> TokenLogprobs:
    best = {}
    if top > 0:
        values, ids = position_logprobs.topk(top)
        best = dict(zip(ids.tolist(), values.tolist()))
    return TokenLogprobs(token, float(position_logprobs[token]), best)


def _one_greedy_token(loaded, job: Job, logits: torch.Tensor, prompt_logprobs) -> Completion:
    """The completion `generate` would give for one greedy new token, from the prompt's last logits."""
    choosable = logits.clone()
    if loaded.processor.protein_token_id < choosable.shape[0]:
        choosable[loaded.processor.protein_token_id] = float("-inf")  # as generate's suppress_tokens
    return _finish_row(loaded, job, [int(choosable.argmax())], logits[None], prompt_logprobs)


def _prompt_logprobs(loaded, jobs: list[Job]) -> tuple[list[list[TokenLogprobs | None] | None], list[torch.Tensor]]:
    """Every prompt token's log-probability given the tokens before it; also each prompt's logits for the
    next (first new) token."""
    result, next_logits = [], []
    for job, logits in zip(jobs, _prompt_logits(loaded, jobs)):
        next_logits.append(logits[-1])
        if not job.echo_logprobs:
            result.append(None)
            continue
        ids = job.prompt.input_ids
        row_logprobs = torch.log_softmax(logits[:-1].float(), dim=-1)  # predicts ids[1:]
        top = job.logprobs or 0
        placeholder = loaded.processor.protein_token_id
        # A placeholder position holds a protein feature, not a token: it has no log-probability.
        result.append(
            [None]
            + [None if ids[i + 1] == placeholder else _token_logprobs(row_logprobs[i], ids[i + 1], top) for i in range(len(ids) - 1)]
        )
    return result, next_logits


# Prompts that share fewer leading tokens than this run in the batch's plain forward: a group's own prefix
# pass and cache copy cost about what so short a prefix saves.
MIN_SHARED_PROMPT_PREFIX = 16


def _prompt_logits(loaded, jobs: list[Job]) -> list[torch.Tensor]:
    """Each job's logits at every prompt position, (num_tokens, vocab).

    lm-eval scores a multiple-choice item as one request per option: the same context, a few tokens of
    continuation each. Prompts that share a long token prefix therefore run that prefix once and only their
    own tokens on top of its cache (each row's logits equal a full forward's up to float round-off); the
    rest run in one right-padded forward.
    """
    logits: list[torch.Tensor | None] = [None] * len(jobs)
    groups = _shared_prefix_groups(jobs, loaded.processor.protein_token_id)
    unshared = [row for shared, rows in groups if shared == 0 for row in rows]
    if unshared:
        input_ids, attention_mask, protein_input_ids = _pad(loaded, [jobs[row] for row in unshared], side="right")
        out = loaded.model(input_ids=input_ids, attention_mask=attention_mask, protein_input_ids=protein_input_ids, use_cache=False).logits
        for index, row in enumerate(unshared):
            logits[row] = out[index, : jobs[row].prompt.num_tokens]
    for shared, rows in groups:
        if shared == 0:
            continue
        group = [jobs[row] for row in rows]
        prefix = torch.tensor([group[0].prompt.input_ids[:shared]], device=loaded.device)
        head = loaded.model(input_ids=prefix, use_cache=True)
        cache = head.cache
        cache.batch_repeat_interleave(len(rows))
        # Every placeholder lies after the prefix (see _shared_prefix_groups), so the rows' proteins all
        # belong to their own tokens.
        suffixes = [_suffix_job(job, shared) for job in group]
        input_ids, suffix_mask, protein_input_ids = _pad(loaded, suffixes, side="right")
        attention_mask = torch.cat([torch.ones(len(rows), shared, dtype=suffix_mask.dtype, device=suffix_mask.device), suffix_mask], dim=1)
        tail = loaded.model(
            input_ids=input_ids, attention_mask=attention_mask, protein_input_ids=protein_input_ids, cache=cache, use_cache=True
        ).logits
        for index, (row, job) in enumerate(zip(rows, group)):
            logits[row] = torch.cat([head.logits[0], tail[index, : job.prompt.num_tokens - shared]], dim=0)
    return logits


def _suffix_job(job: Job, shared: int) -> Job:
    """The job with only its prompt's tokens after the first `shared` (for padding; proteins kept)."""
    return Job(PreparedPrompt(job.prompt.input_ids[shared:], job.prompt.proteins), job.max_new_tokens)


def _shared_prefix_groups(jobs: list[Job], placeholder: int) -> list[tuple[int, list[int]]]:
    """(shared prefix length, row indices) per group of prompts that run a common token prefix once; rows in
    no group come as one group with length 0.

    Sorted, prompts with a common prefix are neighbours, and a run of neighbours shares the smallest common
    prefix of its adjacent pairs. The runs are chosen to run the fewest tokens (a shortest-path over the
    sorted rows: a run costs its prefix once plus every row's own tokens), so the options of one item group
    on their whole context rather than all items on the instruction they share. A prefix is at least
    MIN_SHARED_PROMPT_PREFIX tokens, stops before the first protein placeholder and leaves each prompt at
    least one token of its own.
    """

    def own_limit(ids: list[int]) -> int:
        return min(len(ids) - 1, ids.index(placeholder) if placeholder in ids else len(ids))

    order = sorted(range(len(jobs)), key=lambda row: jobs[row].prompt.input_ids)
    ids = [jobs[row].prompt.input_ids for row in order]
    # adjacent[i]: the prefix rows i - 1 and i of the sorted order could share.
    adjacent = [0] + [
        min(next((k for k, (a, b) in enumerate(zip(ids[i - 1], ids[i])) if a != b), min(len(ids[i - 1]), len(ids[i]))),
            own_limit(ids[i - 1]), own_limit(ids[i]))
        for i in range(1, len(ids))
    ]
    # cost[j], choice[j]: the fewest tokens to run the first j sorted rows, and where the last run starts.
    cost, choice = [0], [(0, 0)]
    for end in range(1, len(ids) + 1):
        best, best_choice = cost[end - 1] + len(ids[end - 1]), (end - 1, 0)  # the last row on its own
        shared, own_tokens = math.inf, len(ids[end - 1])
        for start in range(end - 2, -1, -1):  # the run ids[start:end], two rows or more
            shared = min(shared, adjacent[start + 1])
            if shared < MIN_SHARED_PROMPT_PREFIX:
                break
            own_tokens += len(ids[start])
            run = cost[start] + shared + own_tokens - (end - start) * shared
            if run < best:
                best, best_choice = run, (start, shared)
        cost.append(best)
        choice.append(best_choice)
    groups, unshared, end = [], [], len(ids)
    while end > 0:
        start, shared = choice[end]
        if shared:
            groups.append((shared, sorted(order[start:end])))
        else:
            unshared.append(order[start])
        end = start
    return [(0, sorted(unshared))] + groups if unshared else groups


def _pad(loaded, jobs: list[Job], side: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    longest = max(job.prompt.num_tokens for job in jobs)
    input_ids = torch.full((len(jobs), longest), loaded.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(jobs), longest), dtype=torch.long)
    for row, job in enumerate(jobs):
        ids = torch.tensor(job.prompt.input_ids, dtype=torch.long)
        span = slice(longest - len(ids), longest) if side == "left" else slice(0, len(ids))
        input_ids[row, span] = ids
        attention_mask[row, span] = 1
    proteins = [residues for job in jobs for residues in job.prompt.proteins]
    protein_input_ids = loaded.processor.encode_proteins(proteins).to(loaded.device) if proteins else None
    return input_ids.to(loaded.device), attention_mask.to(loaded.device), protein_input_ids
