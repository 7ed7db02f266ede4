import json
from gateway.media.catalog import set_price

async def test_explore(stack_factory, media_copy):
    set_price(media_copy, "clip", rate_msat=2000, free_ms=3000)
    stack = await stack_factory("--block-interval", "2")
    done = await stack.player("play", stack.info["ws"], "clip", "--max-chunks", "4", "--budget", "20000", "--out", "a.mp4", "--no-pace", check=False)
    print(done.returncode, done.stderr)
    import asyncio
    await asyncio.sleep(5)
    st = await stack.player("status", check=False)
    print(st.returncode, st.stdout, st.stderr)
    ch = await stack.player("channels", check=False)
    print(ch.stdout)
    done = await stack.player("play", stack.info["ws"], "clip", "--budget", "20000", "--out", "a.mp4", "--kind", "multisig", "--max-feerate", "1.5", check=False)
    print(done.returncode, done.stderr)
    assert 0
