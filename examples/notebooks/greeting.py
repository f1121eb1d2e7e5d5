# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # A greeting
#
# A percent-format script: each `# %%` starts a cell.

# %% tags=["parameters"]
name = "world"
times = 2

# %%
for _ in range(times):
    print(f"hello, {name}")

# %% tags=["raises-exception"]
raise ValueError("this error is recorded and the run goes on")

# %%
len(name) * times
