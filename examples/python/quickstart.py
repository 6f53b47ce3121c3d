"""Generate, train an adapter with a progress bar, and edit a photo with it: the Python client in
a few lines. Needs `pip install ./clients/python[images] tqdm` and a running server:

    export STEERSERVE_ADDRESS=127.0.0.1:50051 STEERSERVE_TOKEN=...
    python examples/python/quickstart.py subject1.png subject2.png subject3.png source.png

STEPS=<n> trains for n steps instead of the server's default (the model profile's).
"""

import os
import sys

from tqdm import tqdm

from steerserve_client import Client

*photos, source = sys.argv[1:]
with Client() as client:
    client.generate("a red dotted star on a blue striped background", seed=0).images[0].save("star.png")

    bar = tqdm(desc="training", unit="step")
    job = client.personalize("dreambooth-lora", "my-subject", photos, class_word="circle",
                             steps=int(os.environ.get("STEPS", 0)))
    job = job.wait(progress=lambda e: bar.update(e.step - bar.n) or bar.set_postfix(loss=f"{e.loss:.3f}", state=e.state))
    bar.close()

    edited = client.edit(source, "a circle on a background", f"a {job.token} circle on a background",
                         adapter_id=job.adapter_id, steps=int(os.environ.get("EDIT_STEPS", 0)),
                         progress=lambda p: print(f"\r{p.phase} {p.progress:.0%}", end="", flush=True))
    edited.image.save("edited.png")
    print(f"\nadapter {job.adapter_id}: wrote star.png and edited.png")
