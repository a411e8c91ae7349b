#!/bin/bash
# The OMH grid on a shared 2-core CPU, in phases of falling priority (see benchmarks/omh_grid.yaml). Start it
# twice (e.g. `/work/bin/cpujob reports/omh/run_cpu_phases.sh` in two shells): the workers share the cells through
# the output folder's locks. Then: `.venv/bin/python -m ussbench report reports/omh --name omh`.
set -u
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD"
R=".venv/bin/python -m ussbench run --grid benchmarks/omh_grid.yaml --no-progress --no-report"
ABL='{feature_learner: "STEGO+OMH paper scale"}, {feature_learner: "STEGO+OMH L_cluster only"},
 {feature_learner: "STEGO+OMH levels=1"}, {feature_learner: "STEGO+OMH levels=2"}, {feature_learner: "STEGO+OMH levels=4"},
 {feature_learner: "STEGO+OMH expansion=1"}, {feature_learner: "STEGO+OMH expansion=1.5"},
 {feature_learner: "STEGO+OMH expansion=3"}, {feature_learner: "STEGO+OMH temp=0.05"}, {feature_learner: "STEGO+OMH temp=0.10"}'
PAPER='{feature_learner: "STEGO paper"}, {feature_learner: "HP paper, 300 steps"}, {feature_learner: "SmooSeg paper"}'
LONG='{feature_learner: "HP 300 steps"}'  # HP's earlier 300-step cut, beside its 1,000-step default
MAIN='{feature_learner: STEGO}, {feature_learner: STEGO+OMH}, {feature_learner: HP}, {feature_learner: HP+OMH},
 {feature_learner: SmooSeg}, {feature_learner: SmooSeg+OMH}'
NONHP='{feature_learner: STEGO}, {feature_learner: "STEGO paper"}, {feature_learner: STEGO+OMH},
 {feature_learner: SmooSeg}, {feature_learner: "SmooSeg paper"}, {feature_learner: SmooSeg+OMH}'
echo "start $(date -u +%T)"
$R --seeds 0 --set "exclude=[$LONG, $ABL, $PAPER]" && echo "1. main rows seed 0 done $(date -u +%T)"
$R --seeds 1 2 --set "exclude=[$LONG, $ABL, $PAPER]" && echo "2. main rows seeds 1 2 done $(date -u +%T)"
$R --seeds 0 --set "exclude=[$LONG, $ABL, $MAIN]" && echo "3. paper rows seed 0 done $(date -u +%T)"
$R --seeds 0 --set "exclude=[$LONG, $PAPER, $MAIN, {dataset: camvid}]" && echo "4. ablations seed 0 done $(date -u +%T)"
$R --seeds 1 2 --set "exclude=[$ABL, $MAIN, $LONG]" && echo "5. paper rows seeds 1 2 done $(date -u +%T)"
$R --seeds 1 2 --set "exclude=[$LONG, $PAPER, $MAIN, {dataset: camvid}]" && echo "6. ablations seeds 1 2 done $(date -u +%T)"
$R --seeds 0 1 2 --set "exclude=[$ABL, $MAIN, $PAPER]" && echo "7. HP 300 steps done $(date -u +%T)"
# 8. (stop 23) HP's version 3 (default 1,000 steps) re-keys every HP cell: the HP rows again, 3 seeds, both datasets.
# After phases 1-7 this is all that is left to run; on a fresh output folder phases 1-7 already ran every HP row.
$R --seeds 0 1 2 --set "exclude=[$ABL, $NONHP]" && echo "8. HP rows done $(date -u +%T)"
