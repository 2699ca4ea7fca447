"""Seeds through the OpenAI API: the same seed gives the same text, alone or among other requests."""

from __future__ import annotations

import asyncio

from openai_helpers import CHINESE, ENGLISH, async_client, chat, complete, user


def test_same_seed_same_text_other_seed_other_text(client, model_name):
    texts = [
        complete(client, model_name, ENGLISH, max_tokens=16, temperature=1.0, seed=seed).choices[0].text
        for seed in (123, 123, 124)
    ]
    assert texts[0] == texts[1]
    assert texts[0] != texts[2]
    chats = [
        chat(client, model_name, user("Hi"), max_tokens=16, temperature=1.0, seed=seed).choices[0].message.content
        for seed in (123, 123, 7)
    ]
    assert chats[0] == chats[1] != chats[2]


def test_seeded_requests_are_unaffected_by_concurrent_ones(server, model_name):
    seeded = dict(model=model_name, prompt=ENGLISH, max_tokens=16, temperature=1.0, seed=123)

    async def run():
        async with async_client(server) as aclient:
            alone = (await aclient.completions.create(**seeded)).choices[0].text
            others = [
                aclient.completions.create(model=model_name, prompt=p, max_tokens=m, temperature=t)
                for p, m, t in [
                    (CHINESE, 24, 1.0),
                    ("def fibonacci(n):", 8, 0),
                    ("The quick brown fox " * 8, 20, 0.7),
                    ("Hi", 5, 1.0),
                ]
            ]
            together = await asyncio.gather(
                aclient.completions.create(**seeded),
                *others,
                aclient.completions.create(**seeded),
                aclient.chat.completions.create(
                    model=model_name, messages=user("Hi"), max_tokens=10, temperature=1.0, seed=5
                ),
            )
            chat_alone = await aclient.chat.completions.create(
                model=model_name, messages=user("Hi"), max_tokens=10, temperature=1.0, seed=5
            )
            return alone, together, chat_alone

    alone, together, chat_alone = asyncio.run(run())
    assert together[0].choices[0].text == alone
    assert together[-2].choices[0].text == alone
    assert together[-1].choices[0].message.content == chat_alone.choices[0].message.content
