"""`vheads sweep`: many runs on Ray. Study files (`study`), the plan and the driver, the store's one writer
(`driver`), and the workers that compute batches (`workers`)."""
