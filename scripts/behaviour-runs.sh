#!/usr/bin/env bash
# Short runs of every method (and the branches of their settings) with one metaseg binary, for
# checking that a refactor leaves behaviour unchanged: run it with the binary before and after,
# then compare the two folders with scripts/compare-runs.py.
#
#   scripts/behaviour-runs.sh BINARY OUT_DIR
set -euo pipefail
bin=$1
out=$2
mkdir -p "$out"
budget=(iterations=8 log.validate_every=4 log.checkpoint_every=4 mlb_seg.stage0_iterations=4
    online_pl.stage1_iterations=4 local_contrastive.stage1_iterations=4 ideal.pretrain_iterations=4)
run() {
    local name=$1
    shift
    echo "== $name: $*" >>"$out/stdout.txt"
    "$bin" train --quiet --out "$out/$name" "$@" >>"$out/stdout.txt" 2>>"$out/stderr.txt"
}
run all --method supervised,full,mean-teacher,mlb-seg,online-pl,dtml,local-contrastive,ideal \
    --set "${budget[@]}"
run online-pl-offline --method online-pl --set "${budget[@]}" online_pl.online=false \
    online_pl.teacher_start=teacher online_pl.student_init=scratch
run mlb-seg-variant --method mlb-seg --set "${budget[@]}" mlb_seg.init=scratch \
    mlb_seg.ple_mode=eval mlb_seg.meta_path=reverse mlb_seg.rampup=true mlb_seg.meta_views=true \
    mlb_seg.meta_batch_dice=true 'mlb_seg.save_weights="synth_005"' mlb_seg.ple_average=views \
    mlb_seg.weights=softmax
run local-contrastive-variant --method local-contrastive --set "${budget[@]}" \
    local_contrastive.init=scratch local_contrastive.agreement=0.01
run ideal-encoder --method ideal --set "${budget[@]}" \
    "ideal.encoder=\"$out/all/ideal/pretrain/encoder\""
run dtml-variant --method dtml --set "${budget[@]}" dtml.l1_sdf=false optimizer.kind=adam \
    optimizer.clip=1
run unet-2d --method supervised,mean-teacher --set "${budget[@]}" network.kind=unet \
    'batch.patch=[1, 32, 32]' batch.rotate=10 batch.scale=0.1
# Interrupted inside the first stage and inside the main stage, then resumed.
for method in online-pl local-contrastive; do
    run "$method-resumed" --method "$method" --set "${budget[@]}" --stop-after 2
    run "$method-resumed" --method "$method" --set "${budget[@]}" --stop-after 7 --resume
    run "$method-resumed" --method "$method" --set "${budget[@]}" --resume
done
echo done >>"$out/stdout.txt"
