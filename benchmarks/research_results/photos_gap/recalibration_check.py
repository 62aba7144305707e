"""Research check, kept as it ran (docs/recipe.md, "Batch norm and the photos gap").

    python benchmarks/research_results/photos_gap/recalibration_check.py 16 1 key > recalibration_check.log

Fine-tunes the default recipe on photos 64x64 and after every epoch prints, in %: test accuracy with the key in
eval mode (running statistics), the same after re-estimating batch norm's statistics on the keyed training
images with the current weights, and training-set accuracy in eval mode. The run was stopped after 11 epochs.
"""
import copy, json, sys, time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import kp_plugin.train as T
from kp_plugin import SecretKey, wrap_model
from kp_plugin.data import load_dataset
from kp_plugin.pretrained import load_efficientnet_lite0
torch.set_num_threads(1)
epochs, seed, plain = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == 'plain'
train = load_dataset('photos', split='train', image_size=64)
test = load_dataset('photos', split='test', image_size=64)
key = SecretKey.generate(block_size=4, scheme='shuffle+np+scramble')
torch.manual_seed(seed)
model = T.plain_model(load_efficientnet_lite0(8)) if plain else wrap_model(load_efficientnet_lite0(8), key)
orig = T.evaluate_accuracy
rows = []

def recal(m):
    m = copy.deepcopy(m).to(memory_format=torch.contiguous_format)
    for b in m.modules():
        if isinstance(b, torch.nn.modules.batchnorm._BatchNorm):
            b.reset_running_stats(); b.momentum = None
    m.train()
    with torch.no_grad():
        for images, _ in T.iterate_batches(train, batch_size=64, shuffle=False):
            m(images)
    m.eval()
    return m

def both(m, ds, device=None):
    raw = orig(m, ds, device=device)
    rec = orig(recal(m), ds, device=device)
    trainacc = orig(m, train, device=device)
    rows.append((round(100 * raw, 1), round(100 * rec, 1), round(100 * trainacc, 1)))
    print(len(rows), rows[-1], flush=True)
    m.train()
    return raw

T.evaluate_accuracy = both
T.fit(model, train, config=T.TrainConfig(epochs=epochs, seed=seed), eval_set=test, device='cpu', progress=False)
print(json.dumps(rows))
