"""Research experiment, kept as it ran (docs/recipe.md, "Batch norm and the photos gap"): distil the *public*
pre-trained model's pooled features (on the plain images) into the protected model's pooled features (with the
key), on top of the default objective. The public model is what an attacker has anyway, so the term adds no
task knowledge to the weights beyond the labels. Seeds 0-2 ran without the head-transplant block at the end (added
before the two seed-3 runs, --feature-weight 1 and 0).

    python benchmarks/research_results/photos_gap/feature_distillation.py --seed N --out photos_feature_e32_sN.json
"""
import json, sys, time, argparse
sys.path.insert(0, str(__import__('pathlib').Path(__file__).resolve().parents[3]))
import torch, torch.nn.functional as F
from kp_plugin import SecretKey, wrap_model
from kp_plugin.data import load_dataset
from kp_plugin.evaluate import evaluate_protection
from kp_plugin.objectives import ProtectionObjective
from kp_plugin.pretrained import load_efficientnet_lite0
from kp_plugin.train import TrainConfig, fit

p = argparse.ArgumentParser()
p.add_argument('--dataset', default='photos'); p.add_argument('--size', type=int, default=64)
p.add_argument('--epochs', type=int, default=32); p.add_argument('--seed', type=int, default=1)
p.add_argument('--feature-weight', type=float, default=1.0); p.add_argument('--out')
args = p.parse_args()
torch.set_num_threads(1)
train = load_dataset(args.dataset, split='train', image_size=args.size)
test = load_dataset(args.dataset, split='test', image_size=args.size)
key = SecretKey.generate(block_size=4, scheme='shuffle+np+scramble')
torch.manual_seed(args.seed)
protected = wrap_model(load_efficientnet_lite0(len(train.classes)), key)
public = load_efficientnet_lite0(len(train.classes)).eval()
for q in public.parameters(): q.requires_grad_(False)
captured = {}
protected.unwrap().classifier.register_forward_hook(lambda m, i, o: captured.__setitem__('f', i[0]))

class FeatureObjective(ProtectionObjective):
    def __call__(self, model, images01, labels, logits, teacher_logits=None):
        student = captured['f']  # pre-logits of the key pass (the last forward before this call)
        loss, parts = super().__call__(model, images01, labels, logits, teacher_logits)
        if model.training and student.shape[0] == images01.shape[0]:
            with torch.no_grad():
                target = public.forward_head(public.forward_features((images01 - 0.5) / 0.5), pre_logits=True)
            feat = (1 - F.cosine_similarity(student.float(), target.float(), dim=-1)).mean()
            loss = loss + args.feature_weight * feat
            parts['feature'] = float(feat.detach())
        return loss, parts

obj = FeatureObjective(wrong_key_weight=2.0, suppression_fraction=0.5)
config = TrainConfig(epochs=args.epochs, seed=args.seed, objective=obj)
started = time.time()
run = fit(protected, train, config=config, device='cpu', progress=False, eval_set=test)
res = {'dataset': args.dataset, 'epochs': args.epochs, 'seed': args.seed, 'feature_weight': args.feature_weight,
       'objective': 'ce+wrong2[0.5 of batch](uniform)+feature(public, cosine)', 'protected_seconds': time.time() - started,
       'test_curve': [round(h['eval_accuracy'], 4) for h in run.history],
       'train_curve': [round(h['accuracy'], 4) for h in run.history],
       'feature_curve': [round(h.get('feature', 0), 4) for h in run.history]}
print(json.dumps(res), flush=True)
report = evaluate_protection(protected, test, num_wrong_keys=100, progress=False)
res.update(key_accuracy=report.key_accuracy, wrong_key_accuracy_mean=report.wrong_key_accuracy_mean,
           wrong_key_accuracy_max=report.wrong_key_accuracy_max, plain_accuracy=report.plain_accuracy)
# Head transplant: the public backbone on plain images with the protected model's classifier (an attacker has
# both). If the protected head reads public-like features, this recovers the task without the key.
import copy
from kp_plugin.train import Normalize, evaluate_accuracy
transplant = copy.deepcopy(public)
transplant.classifier.load_state_dict(protected.unwrap().classifier.state_dict())
res['head_transplant_accuracy'] = evaluate_accuracy(torch.nn.Sequential(Normalize((0.5,) * 3, (0.5,) * 3), transplant), test)
print(json.dumps(res), flush=True)
if args.out: open(args.out, 'w').write(json.dumps(res, indent=2))
