"""Online preference learning: rollouts from the current policy (``rollout``), reward sources behind one
batched interface (``rewards``), and the GRPO / RLOO / online-DPO jobs (``train``)."""
