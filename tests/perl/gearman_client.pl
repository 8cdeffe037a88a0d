#!/usr/bin/perl
# One foreground job through Gearman::Client (Debian's libgearman-client-perl) over TLS: the
# Perl client of tests/test_interop_tls.py.
#
#   perl gearman_client.pl --port N [--ca CA.pem] [--cert CERT.pem --key KEY.pem]
#                          [--tls-version TLSv1_2] [--timeout SECONDS] FUNCTION WORKLOAD
#
# Prints "result: <the worker's result>" and exits 0; or prints "failed: <why>" and exits 1,
# where <why> is what the library reported (its task's on_fail reason, or the message it
# died with), then IO::Socket::SSL's last error, if any, as "(SSL: ...)".
use strict;
use warnings;

use FindBin;
use lib $FindBin::Bin;
use Gearman::Client;
use TlsJobServer qw(parse_options job_server);

my $option = parse_options(
    '--port N [--ca F] [--cert F --key F] [--tls-version V] [--timeout S] FUNCTION WORKLOAD',
    ['timeout=f'], timeout => 10);
@ARGV == 2 or die "usage: $0 [options] FUNCTION WORKLOAD\n";
my ($function, $workload) = @ARGV;
$| = 1;
# A write to a connection the server has closed (a refused TLS 1.3 client's close_notify, or
# its SUBMIT_JOB) would kill the script by SIGPIPE, silently; a long-running program ignores
# the signal and gets the library's error instead, which is what the test wants to see.
$SIG{PIPE} = 'IGNORE';

# command_timeout bounds the wait for JOB_CREATED, the task's timeout the wait for its result.
my $client = Gearman::Client->new(
    job_servers     => [job_server($option)],
    command_timeout => $option->{timeout},
);
my $failure;
my $result = eval {
    $client->do_task(
        $function, $workload,
        {timeout => $option->{timeout}, on_fail => sub { $failure = shift // 'no reason' }},
    );
};
my $died = $@;
if (defined $result) {
    print "result: $$result\n";
    exit 0;
}
my $why = $died || $failure || 'no result';
$why =~ s/\0/ -- /g;    # an ERROR packet's code and text, as Gearman::Worker shows them
$why =~ s/\s+\z//;
$why .= " (SSL: $IO::Socket::SSL::SSL_ERROR)" if $IO::Socket::SSL::SSL_ERROR;
print "failed: $why\n";
exit 1;
