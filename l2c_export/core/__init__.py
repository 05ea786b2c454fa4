"""What every stage shares and none of them needs PyTorch for: schedules, the subset plan, the manifest (the only
contract between building and running), MAC counts, strict JSON and atomic files, image grids."""
