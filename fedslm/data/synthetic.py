"""A synthetic data set of bank customer messages by intent, skewed per site.

It lets the demo and the tests run with no external data. Each site (a bank region) differs in
two ways, as real federated data does: its own intent mix, drawn from Dirichlet(``skew``), and
its own phrasing (city names, greetings, sign-offs, formality). Intents share slots (cards,
merchants, amounts) and filler sentences, so the task is learnable but not trivial.

Randomness comes only from numpy generators seeded from the arguments, so the same call gives
the same rows in any process.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

PROMPT_TEMPLATE = "Classify the customer message into an intent.\nMessage: {text}\nIntent:"

_TEMPLATES: dict[str, tuple[str, ...]] = {
    "card_lost": (
        "I lost my {card} {time} somewhere in {city}.",
        "My {card} is missing and I think I left it at the {merchant}.",
        "I can not find my {card} anywhere, can you block it?",
        "Someone stole my wallet {time} with my {card} inside.",
        "My {card} fell out of my bag in {city} and I need a new one.",
        "I dropped my {card} on the bus {time}, please cancel it and send a replacement.",
        "I have no idea where my {card} is, it was in my coat {time}.",
    ),
    "card_declined": (
        "My {card} was declined at the {merchant} {time}.",
        "Why did my {card} not work when I tried to pay {amount} at the {merchant}?",
        "The payment of {amount} keeps getting refused on my {card}.",
        "I tried to buy something online for {amount} and the card was rejected.",
        "The machine at the {merchant} in {city} said my card was declined but I have money.",
        "Every time I use my {card} at a shop it says transaction not approved.",
        "My {card} stopped working {time}, no payment goes through.",
    ),
    "transfer_failed": (
        "I sent {amount} to my {person} {time} but it never arrived.",
        "My transfer of {amount} failed in the {channel} and the money left my account.",
        "The payment to my landlord did not go through {time}.",
        "I tried to move {amount} to my savings account but got an error in the {channel}.",
        "A transfer I made from the {channel} is stuck as pending since {time}.",
        "The money I sent to my {person} in {city} bounced back, what went wrong?",
        "My {person} says the {amount} I sent {time} is not in their account.",
    ),
    "balance_inquiry": (
        "How much money do I have in my {account} right now?",
        "Can you tell me the current balance of my {account}?",
        "I want to check my balance but the {channel} is not showing it.",
        "What is my available balance after the payment of {amount} {time}?",
        "Please send me the balance for my {account}.",
        "I need to know how much is left in my {account} before I pay rent.",
        "Is my {account} still above {amount} after the bills went out?",
    ),
    "loan_application": (
        "I would like to apply for a personal loan of {amount}.",
        "How do I apply for a loan to buy a car?",
        "Can I borrow {amount} to fix up my kitchen?",
        "I started a loan application in the {channel} {time}, what happens next?",
        "What documents do I need to apply for a small business loan?",
        "Am I able to get a loan if I have been a customer for {years} years?",
        "I need to borrow {amount} for my wedding, how long does a loan decision take?",
    ),
    "fraud_report": (
        "There is a payment of {amount} to a {merchant} that I did not make.",
        "Someone used my {card} in {city} {time} and it was not me.",
        "I see strange payments on my {account} that I do not recognise.",
        "I think my account was hacked, there are charges I never made.",
        "I got a text asking for my password and then money disappeared from my {account}.",
        "A charge of {amount} appeared {time} from a shop I have never been to.",
        "My {card} is still in my wallet but it was used at a {merchant} in {city}.",
    ),
    "address_change": (
        "I moved to {city} and need to update my address.",
        "Please change the address on my account to my new home in {city}.",
        "How do I update my home address in the {channel}?",
        "My letters are still going to my old flat, I moved {time}.",
        "I need to change my postal address before my new {card} is sent.",
        "We are moving house next month, how do I change our address?",
        "My {person} and I have a new address in {city}, can you update both accounts?",
    ),
    "pin_reset": (
        "I forgot the pin for my {card}.",
        "How can I reset my pin? I entered it wrong three times.",
        "My {card} is blocked because I typed the wrong pin at the {merchant}.",
        "Can you send me a new pin for my {card}?",
        "I want to change my pin to something easier to remember.",
        "The cash machine in {city} kept my card after the wrong pin.",
        "I can not remember my pin since I got the new {card} {time}.",
    ),
    "mortgage_rate": (
        "What is the current interest rate on your fixed mortgage?",
        "My mortgage deal ends soon, what rates can you offer me?",
        "Are your mortgage rates going up this year?",
        "I want to compare the variable rate with the fixed rate for a home in {city}.",
        "How much interest would I pay on a mortgage of {amount}?",
        "Can I switch my mortgage to a lower rate?",
        "We are buying a house in {city}, what mortgage rate would we get?",
    ),
    "account_closure": (
        "I want to close my {account}.",
        "Please close my account and send the remaining {amount} to my other bank.",
        "How do I close my account, I am moving to another bank?",
        "I no longer need my {account}, can you shut it down?",
        "I would like to cancel my account and my {card} today.",
        "What do I need to do to close a joint account with my {person}?",
        "I am leaving the bank, please end my {account} and stop all payments.",
    ),
}

INTENTS: tuple[str, ...] = tuple(_TEMPLATES)

# Sentences that fit any intent; some mention cards or payments on purpose, so a model has to
# read the whole message rather than key on one word.
_FILLERS: tuple[str, ...] = (
    "I have been with the bank for {years} years.",
    "I usually use the {channel}.",
    "This is the second time I am writing about this.",
    "I am a bit worried about this.",
    "I tried calling but nobody answered.",
    "I am travelling to {city} next week.",
    "I used my {card} at the {merchant} {time} without any problem.",
    "My {person} told me to get in touch.",
    "I could not find the answer in the {channel}.",
    "I paid {amount} for my phone bill {time} and that was fine.",
    "My account number should be on file.",
)

_CARDS = ("debit card", "credit card", "gold card", "travel card", "contactless card")
_ACCOUNTS = (
    "current account",
    "savings account",
    "joint account",
    "business account",
    "student account",
)
_CHANNELS = ("mobile app", "app", "website", "online banking", "branch", "phone line")
_TIMES = (
    "this morning",
    "yesterday",
    "last night",
    "two days ago",
    "on Monday",
    "on Friday",
    "earlier today",
    "last week",
    "an hour ago",
)
_PEOPLE = ("brother", "sister", "mother", "father", "friend", "landlord", "partner", "son")
_MERCHANTS = (
    "grocery store",
    "petrol station",
    "coffee shop",
    "online shop",
    "hotel",
    "pharmacy",
    "supermarket",
    "train station",
    "bookshop",
    "restaurant",
    "cinema",
    "garden centre",
)


@dataclass(frozen=True)
class _Region:
    cities: tuple[str, ...]
    merchants: tuple[str, ...]


_REGIONS: tuple[_Region, ...] = (
    _Region(("Leeds", "York", "Hull", "Durham", "Carlisle"), _MERCHANTS[:8]),
    _Region(("Brighton", "Dover", "Exeter", "Plymouth", "Bath"), _MERCHANTS[2:10]),
    _Region(("Bristol", "Cardiff", "Swansea", "Gloucester", "Hereford"), _MERCHANTS[4:12]),
    _Region(("Norwich", "Cambridge", "Ipswich", "Colchester", "Lincoln"), _MERCHANTS[::2]),
    _Region(("Derby", "Leicester", "Coventry", "Nottingham", "Stoke"), _MERCHANTS[1::2]),
    _Region(("Glasgow", "Dundee", "Perth", "Inverness", "Aberdeen"), _MERCHANTS[3:11]),
)


@dataclass(frozen=True)
class _Tone:
    greetings: tuple[str, ...]
    signoffs: tuple[str, ...]
    extras: tuple[str, ...]
    greet_p: float
    sign_p: float
    lower: bool


_TONES: tuple[_Tone, ...] = (
    _Tone(
        greetings=("Good morning,", "Good afternoon,", "Dear team,", "Dear sir or madam,"),
        signoffs=(
            "Kind regards.",
            "Thank you for your help.",
            "Yours sincerely.",
            "Many thanks in advance.",
        ),
        extras=("Could you please look into this.", "I would be grateful for a quick reply."),
        greet_p=0.85,
        sign_p=0.85,
        lower=False,
    ),
    _Tone(
        greetings=("hi,", "hey,", "hi there,", "hello!", "hiya,"),
        signoffs=("thanks!", "cheers", "thanks a lot", "ta"),
        extras=("pls help", "any ideas?", "this is so annoying"),
        greet_p=0.6,
        sign_p=0.6,
        lower=False,
    ),
    _Tone(
        greetings=("hello", "hi"),
        signoffs=("asap", "thanks", "urgent"),
        extras=("need help", "please sort"),
        greet_p=0.15,
        sign_p=0.3,
        lower=True,
    ),
)


@dataclass(frozen=True)
class _Style:
    region: _Region
    tone: _Tone
    pound_words: bool  # "120 pounds" rather than "£120"


def _entropy(seed: int) -> int:
    # SeedSequence wants non-negative ints; any config seed is allowed
    return seed % 2**64


def _style(seed: int, index: int) -> _Style:
    """Site ``index``'s style; consecutive sites get different regions and tones."""
    s = _entropy(seed)
    return _Style(
        region=_REGIONS[(s + index) % len(_REGIONS)],
        tone=_TONES[(s // len(_REGIONS) + index) % len(_TONES)],
        pound_words=(index + s) % 2 == 1,
    )


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _amount(rng: np.random.Generator, style: _Style) -> str:
    value = int(rng.choice((5, 10, 20, 25, 50, 100))) * int(rng.integers(1, 40))
    return f"{value} pounds" if style.pound_words else f"£{value}"


def _fill(template: str, rng: np.random.Generator, style: _Style) -> str:
    # draw every slot in a fixed order, so the stream of draws does not depend on the template
    slots = {
        "card": _pick(rng, _CARDS),
        "account": _pick(rng, _ACCOUNTS),
        "channel": _pick(rng, _CHANNELS),
        "time": _pick(rng, _TIMES),
        "person": _pick(rng, _PEOPLE),
        "merchant": _pick(rng, style.region.merchants),
        "city": _pick(rng, style.region.cities),
        "amount": _amount(rng, style),
        "years": str(int(rng.integers(1, 31))),
    }
    return template.format(**slots)


def _message(intent: str, rng: np.random.Generator, style: _Style) -> str:
    tone = style.tone
    parts: list[str] = []
    if rng.random() < tone.greet_p:
        parts.append(_pick(rng, tone.greetings))
    if rng.random() < 0.2:
        parts.append(_fill(_pick(rng, _FILLERS), rng, style))
    parts.append(_fill(_pick(rng, _TEMPLATES[intent]), rng, style))
    if rng.random() < 0.25:
        parts.append(_fill(_pick(rng, _FILLERS), rng, style))
    if rng.random() < 0.2:
        parts.append(_pick(rng, tone.extras))
    if rng.random() < tone.sign_p:
        parts.append(_pick(rng, tone.signoffs))
    text = " ".join(parts)
    if tone.lower:
        text = text.lower().rstrip(".")
    return text


def _intent_mix(rng: np.random.Generator, skew: float) -> np.ndarray:
    """Dirichlet(skew) intent probabilities, floored so every intent can still occur."""
    mix = rng.dirichlet([skew] * len(INTENTS))
    if not np.all(np.isfinite(mix)):
        mix = np.full(len(INTENTS), 1.0 / len(INTENTS))
    floor = 0.02
    mix = (1.0 - floor) * mix + floor / len(INTENTS)
    return mix / mix.sum()


def make_prompt(text: str) -> str:
    """The causal-LM instruction for one message."""
    return PROMPT_TEMPLATE.format(text=text)


def generate_bank_messages(
    site_names: Sequence[str], rows_per_site: int, seed: int, skew: float = 1.0
) -> list[dict[str, str]]:
    """Rows of synthetic customer messages, ``rows_per_site`` for each site, in site order.

    Each row has ``site``, ``text``, ``label`` (an intent), ``prompt`` (an instruction to
    classify the text) and ``response`` (``" <label>"``). Site ``i``'s rows depend only on
    ``seed``, ``i``, ``rows_per_site`` and ``skew``.
    """
    if rows_per_site < 0:
        raise ValueError(f"rows_per_site must be >= 0, got {rows_per_site}")
    if skew <= 0:
        raise ValueError(f"skew must be positive, got {skew}")
    rows: list[dict[str, str]] = []
    for index, site in enumerate(site_names):
        rng = np.random.default_rng(np.random.SeedSequence([_entropy(seed), index]))
        style = _style(seed, index)
        mix = _intent_mix(rng, skew)
        picks = rng.choice(len(INTENTS), size=rows_per_site, p=mix)
        for pick in picks:
            label = INTENTS[int(pick)]
            text = _message(label, rng, style)
            rows.append(
                {
                    "site": site,
                    "text": text,
                    "label": label,
                    "prompt": make_prompt(text),
                    "response": f" {label}",
                }
            )
    return rows


def corpus_for_tokenizer(seed: int = 0, n: int = 3000) -> list[str]:
    """``n`` texts (messages, and prompts with their responses) covering every region, tone
    and intent, for training a small tokenizer. Deterministic in ``seed``."""
    if n <= 0:
        return []
    # one site per region (tones cycle too), so every city and greeting appears
    sites = [f"region-{i + 1}" for i in range(len(_REGIONS))]
    per_site = math.ceil(n / (2 * len(sites)))
    rows = generate_bank_messages(sites, per_site, seed, skew=1.0)
    texts: list[str] = [" ".join(INTENTS)]
    for row in rows:
        texts.append(row["text"])
        texts.append(row["prompt"] + row["response"])
    return texts[:n]
