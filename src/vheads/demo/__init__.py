"""The embedded demo: the small LLaVA built (`build`) and trained (`train`) on ShapesQA, its weights (`weights/`),
and the whole study in one command (`study`, behind `vheads demo`)."""
